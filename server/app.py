"""App factory, lifespan (load model -> start engine -> drain on shutdown) and `serve`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from xllm import __version__
from xllm.server.deps import ClientDisconnected, Runtime
from xllm.server.errors import ERROR_TYPES, ServingError, error_body
from xllm.server.logs import setup_logging
from xllm.server.metrics import Metrics
from xllm.server.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
)
from xllm.server.routers import chat, completions, health, openai, web
from xllm.server.settings import Settings

if TYPE_CHECKING:
    from xllm.model.xllm import XLLM
    from xllm.server.engine.contract import EngineClient

log = logging.getLogger("xllm.server")


def create_app(settings: Settings, model: XLLM | None = None) -> FastAPI:
    """The FastAPI app. The model loads in the background (given `model` is used as is)."""
    runtime = Runtime(settings, Metrics(), api_keys=settings.api_keys())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(settings.media_workers, thread_name_prefix="xllm-media")
        loading = asyncio.create_task(_start_model(runtime, model, executor))
        try:
            yield
        finally:
            runtime.draining = True
            await asyncio.gather(loading, return_exceptions=True)
            if runtime.engine is not None:
                await asyncio.to_thread(_drain, runtime.engine, settings.drain_timeout)
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="xllm",
        version=__version__,
        description="X-LLM multimodal chat server: images, audio and video into a frozen GLM.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    for router in (chat.router, openai.router, completions.router, health.router, web.router):
        app.include_router(router)
    _add_error_handlers(app)
    # Middleware added first runs innermost: the key check sits inside CORS (preflights and 401s
    # get CORS headers) and inside the body limit and request context (401s are logged).
    if runtime.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=runtime.api_keys)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics)
    return app


async def _start_model(runtime: Runtime, model: XLLM | None, executor: ThreadPoolExecutor) -> None:
    """Load the model and start the engine: in a child process, or in a thread of this one
    (`--engine thread`, or a `model` object given by an embedding application)."""
    from xllm.model.checkpoint import default_model_dir, load_model
    from xllm.model.media import MediaLimits
    from xllm.model.preprocess import MediaPreparer
    from xllm.server.engine.config import EngineConfig
    from xllm.server.engine.process import EngineProcess, EngineSpec
    from xllm.server.engine.worker import Engine
    from xllm.server.remote_media import RemoteMediaFetcher
    from xllm.server.serving import ChatService, ServingLimits

    s = runtime.settings
    config = EngineConfig(
        max_batch=s.max_batch,
        max_queue=s.max_queue,
        max_model_len=s.max_model_len,
        prefill_chunk=s.prefill_chunk,
        default_max_tokens=s.default_max_tokens,
        encoder_cache_mb=s.encoder_cache_mb,
        stall_timeout=s.stall_timeout or None,
        compile=s.compile,
        gpu_memory_utilization=s.gpu_memory_utilization,
        kv_cache_memory_bytes=(
            int(s.kv_cache_memory_gb * 2**30) if s.kv_cache_memory_gb is not None else None
        ),
    )
    engine: EngineClient
    try:
        if model is not None:
            preparer, engine = model.preparer, Engine(model, config, runtime.metrics)
        else:
            model_dir = s.model or await asyncio.to_thread(default_model_dir)
            log.info(
                "loading model",
                extra={"model": str(model_dir), "quantize": s.quantize, "engine": s.engine},
            )
            preparer = await asyncio.to_thread(MediaPreparer.from_pretrained, model_dir)
            if s.engine == "process":
                spec = EngineSpec(
                    model_dir, s.device, s.dtype, s.quantize, config, cpu_threads(s), s.log_format
                )
                engine = EngineProcess(spec, runtime.metrics)
            else:
                model = await asyncio.to_thread(
                    load_model, model_dir, device=s.device, dtype=s.dtype, quantize=s.quantize
                )
                engine = Engine(model, config, runtime.metrics)
        limits = ServingLimits(
            MediaLimits(
                max_image_pixels=s.max_image_pixels,
                max_audio_seconds=s.max_audio_seconds,
                max_video_seconds=s.max_video_seconds,
                max_bytes=s.max_upload_bytes,
            ),
            max_media_per_request=s.max_media_per_request,
            request_timeout=s.request_timeout,
        )
        fetcher = RemoteMediaFetcher(s.allow_remote_media, s.max_upload_bytes)
        await asyncio.to_thread(engine.start)
        runtime.engine = engine
        runtime.service = ChatService(
            preparer, engine, limits, executor, fetcher, preparer.config.name, runtime.metrics
        )
        log.info(
            "model ready",
            extra={
                "model": preparer.config.name,
                "modalities": list(preparer.modalities),
                "engine": "thread" if isinstance(engine, Engine) else "process",
                "engine_pid": engine.pid,
                "max_batch": engine.config.max_batch,
                "max_model_len": engine.max_model_len,
                "kv_cache_mb": round(engine.kv_cache_bytes / 2**20, 1),
            },
        )
    except Exception as exc:
        runtime.load_error = str(exc)
        log.exception("model failed to load")


def _drain(engine: EngineClient, timeout: float) -> None:
    """Stop intake, let running requests finish up to `timeout`, then end the rest with an error."""
    engine.stop_intake()
    if not engine.join(timeout):
        engine.abort_all(f"the server is shutting down (drain deadline of {timeout:g} s passed)")
        engine.join(5)
    engine.shutdown()


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, type: str | None = None
) -> JSONResponse:
    body = error_body(message, type or ERROR_TYPES.get(status, "error"), status)
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _error(exc.status, exc.message, headers, exc.type)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # A body that is not JSON at all is malformed (400); well-formed but wrong values are 422.
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:5]
        )
        return _error(status, problems or "invalid request")

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return _error(499, "client disconnected")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "unhandled error", extra={"request_id": getattr(request.state, "request_id", None)}
        )
        return _error(500, "internal server error")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM drains: /ready and new requests answer 503, running requests
    finish (up to the drain deadline), then the process exits 0."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._draining = False
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.runtime.draining = True
        log.info("SIGTERM: draining", extra={"deadline_s": self.runtime.settings.drain_timeout})
        threading.Thread(target=self._drain_then_exit, daemon=True).start()

    def _drain_then_exit(self) -> None:
        if self.runtime.engine is not None:
            _drain(self.runtime.engine, self.runtime.settings.drain_timeout)
        self.should_exit = True

    def watch_worker(self) -> None:
        """A dead or wedged model worker cannot recover in-process: exit 3 for the supervisor."""
        while not self.should_exit:
            engine = self.runtime.engine
            if engine is not None and engine.wedged:
                log.error(
                    "model worker stalled; exiting so the supervisor restarts the server",
                    extra={"stalled_s": round(engine.stalled_for, 1)},
                )
                engine.abandon("the model worker stopped responding; the server is restarting")
                self.exit_code = 3
                self.should_exit = True
                return
            if engine is not None and engine.dead is not None:
                log.error("model worker died; exiting so the supervisor restarts the server")
                self.exit_code = 3
                self.should_exit = True
                return
            threading.Event().wait(0.5)


def serve(settings: Settings) -> int:
    setup_logging(settings.log_format)
    _set_torch_threads(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.runtime)
    threading.Thread(target=server.watch_worker, daemon=True, name="xllm-watchdog").start()
    server.run()
    return server.exit_code


def cpu_threads(settings: Settings) -> int | None:
    """Intra-op threads for the model on the CPU: leave a core to the event loop and the media
    pool (torch's one per core oversubscribes them). None on a GPU: torch's default."""
    import torch

    if settings.device == "cpu" or not torch.cuda.is_available():
        return settings.torch_threads or max(1, (os.cpu_count() or 2) - 1)
    return None


def _set_torch_threads(settings: Settings) -> None:
    """Process-wide: this process's preprocessing, and the model when it runs in a thread."""
    import torch

    threads = cpu_threads(settings)
    if threads is not None:
        torch.set_num_threads(threads)
