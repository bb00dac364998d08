"""The app factory and its lifespan (load the model -> start the engine -> drain on shutdown)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from xllm import __version__
from xllm.server.deps import Runtime
from xllm.server.errors import add_error_handlers
from xllm.server.files import FileStore
from xllm.server.lifecycle import drain, start_model
from xllm.server.metrics import Metrics
from xllm.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from xllm.server.routers import audio, chat, completions, files, health, openai, web
from xllm.server.settings import Settings

if TYPE_CHECKING:
    from xllm.model.xllm import XLLM


def create_app(settings: Settings, model: XLLM | None = None) -> FastAPI:
    """The FastAPI app. The model loads in the background (given `model` is used as is)."""
    runtime = Runtime(settings, Metrics(), api_keys=settings.api_keys())
    runtime.files = FileStore(settings.file_limits())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(settings.media_workers, thread_name_prefix="xllm-media")
        loading = asyncio.create_task(start_model(runtime, model, executor))
        try:
            yield
        finally:
            runtime.draining = True
            await asyncio.gather(loading, return_exceptions=True)
            if runtime.engine is not None:
                await asyncio.to_thread(drain, runtime.engine, settings.drain_timeout)
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="xllm",
        version=__version__,
        description="X-LLM multimodal chat server: images, audio and video into a frozen GLM.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    routers = (chat, openai, completions, audio, files, health, web)
    for router in (module.router for module in routers):
        app.include_router(router)
    add_error_handlers(app)
    # Middleware added first runs innermost: the key check sits inside CORS (preflights and 401s
    # get CORS headers) and inside the body limit and request context (401s are logged).
    if runtime.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=runtime.api_keys)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics)
    return app
