"""/health and /info."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.encoders import jsonable_encoder

from ... import __version__
from ..deps import AUTH, State
from ..schemas import HealthOut, IndexInfoOut, InfoOut, error_responses

router = APIRouter(tags=["meta"])


@router.get("/health", response_model=HealthOut)
async def health(state: State) -> HealthOut:  # async: answers even while the worker threads are all busy
    """Liveness check; open even when a token is set."""
    return HealthOut(status="ok", indexes=len(state.served))


@router.get("/info", response_model=InfoOut, dependencies=AUTH, responses=error_responses(401))
def info(state: State) -> InfoOut:
    """The served indexes: names, versions, image counts, model."""
    out = []
    for s in state.served.values():
        s.maybe_refresh()
        out.append(IndexInfoOut(name=s.name, version=int(s.index.version), default=s.default,
                                info=jsonable_encoder(s.index.info())))  # fmt: skip
    return InfoOut(version=__version__, indexes=out)
