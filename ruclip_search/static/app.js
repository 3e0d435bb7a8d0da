// ruclip-search web page: text search, search by an uploaded photo, a viewer with "похожие". No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 40;
let current = null; // {kind: "text"|"similar"|"image", q?, id?, file?, label}
let offset = 0;

function token() { return localStorage.getItem("ruclip_token") || ""; }

function indexParam() {
  const sel = $("index");
  return !sel.hidden && sel.value ? sel.value : "";
}

async function api(path, params = {}, init = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) if (v !== "" && v != null) url.searchParams.set(k, v);
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const res = await fetch(url, { ...init, headers });
  if (res.status === 401) { $("token-box").hidden = false; $("token").focus(); throw new Error("Нужен токен"); }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const d = body.detail;
    throw new Error(typeof d === "string" ? d : Array.isArray(d) ? d.map((e) => e.msg).join("; ") : res.statusText);
  }
  return body;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function basename(p) { return p.split(/[\\/]/).pop(); }

function card(hit) {
  const el = document.createElement("button");
  el.className = "card";
  el.type = "button";
  el.dataset.id = hit.id;
  el.title = hit.path;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = basename(hit.path);
  img.src = hit.thumbnail_url;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score == null ? "" : hit.score.toFixed(3);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = basename(hit.path);
  el.append(img, score, name);
  el.addEventListener("click", () => openViewer(hit));
  return el;
}

async function run(more = false) {
  if (!current) return;
  if (!more) { offset = 0; $("grid").replaceChildren(); }
  const params = { k: PAGE, offset, index: indexParam() };
  setStatus("Ищу…");
  try {
    let res;
    if (current.kind === "text") res = await api("/search", { ...params, q: current.q });
    else if (current.kind === "similar") res = await api(`/similar/${current.id}`, params);
    else {
      const form = new FormData();
      form.append("file", current.file);
      res = await api("/search/image", params, { method: "POST", body: form });
    }
    res.hits.forEach((h) => $("grid").append(card(h)));
    offset += res.hits.length;
    const shown = $("grid").children.length;
    setStatus(shown ? `${current.label}: ${shown} фото · ${res.took_ms.toFixed(0)} мс` : `${current.label}: ничего не найдено`);
    $("more").hidden = res.hits.length < PAGE;
  } catch (e) {
    setStatus(e.message, true);
    $("more").hidden = true;
  }
}

function openViewer(hit) {
  const big = $("big");
  const u = new URL(hit.thumbnail_url, location.origin);
  u.searchParams.set("size", "1024");
  big.src = u.pathname + u.search;
  big.alt = basename(hit.path);
  $("meta-path").textContent = hit.path;
  const bits = [];
  if (hit.width && hit.height) bits.push(`${hit.width}×${hit.height}`);
  if (hit.format) bits.push(hit.format);
  if (hit.taken_at) bits.push(new Date(hit.taken_at).toLocaleString("ru-RU"));
  if (hit.score != null) bits.push(`сходство ${hit.score.toFixed(3)}`);
  $("meta-info").textContent = bits.join(" · ");
  $("original").href = hit.file_url;
  $("similar").onclick = () => {
    closeViewer();
    current = { kind: "similar", id: hit.id, label: `Похожие на «${basename(hit.path)}»` };
    history.replaceState(null, "", `#similar=${hit.id}`);
    run();
  };
  $("viewer").hidden = false;
  $("similar").focus();
}

function closeViewer() { $("viewer").hidden = true; $("big").removeAttribute("src"); }

async function loadIndexes() {
  try {
    const info = await api("/info");
    const sel = $("index");
    sel.replaceChildren(...info.indexes.map((i) => new Option(`${i.name} (${i.info.images ?? "?"})`, i.name)));
    sel.hidden = info.indexes.length < 2;
  } catch (e) { /* the token box or the status line says what is wrong */ }
}

function start() {
  $("search-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("q").value.trim();
    if (!q) return;
    current = { kind: "text", q, label: `«${q}»` };
    history.replaceState(null, "", "#q=" + encodeURIComponent(q));
    run();
  });
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (!file) return;
    current = { kind: "image", file, label: `Похожие на «${file.name}»` };
    run();
    $("upload").value = "";
  });
  $("more").addEventListener("click", () => run(true));
  $("close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) closeViewer(); });
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeViewer(); });
  $("index").addEventListener("change", () => run());
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    localStorage.setItem("ruclip_token", t);
    document.cookie = `ruclip_token=${encodeURIComponent(t)}; path=/; SameSite=Strict`;
    $("token-box").hidden = true;
    loadIndexes().then(() => run());
  });
  if (token()) document.cookie = `ruclip_token=${encodeURIComponent(token())}; path=/; SameSite=Strict`;
  loadIndexes();
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("q")) {
    $("q").value = hash.get("q");
    current = { kind: "text", q: hash.get("q"), label: `«${hash.get("q")}»` };
    run();
  } else if (/^\d+$/.test(hash.get("similar") || "")) {
    current = { kind: "similar", id: hash.get("similar"), label: "Похожие" };
    run();
  }
}

start();
