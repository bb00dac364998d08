"""Probes and metrics: /health (liveness), /ready (readiness), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xllm.server.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "loading, draining or the worker is down"}})
async def ready(runtime: RuntimeDep) -> JSONResponse:
    """200 only when the model is loaded and requests are accepted."""
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    if runtime.draining:
        reason = "draining"
    elif runtime.load_error:
        reason = f"model failed to load: {runtime.load_error}"
    elif runtime.engine is not None and runtime.engine.wedged:
        reason = "model worker is not responding"
    elif runtime.engine is not None and not runtime.engine.alive:
        reason = "model worker is down"
    else:
        reason = "loading"
    return JSONResponse({"status": reason}, status_code=503)


@router.get("/metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
