"""The API's routers: search, images, meta (health, info) and the web page."""
