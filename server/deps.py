"""Shared route dependencies: the runtime (model, engine, service) and request ids. (The API key
is checked once, by ApiKeyMiddleware, before any of the body is read.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from xllm.server.engine.contract import EngineClient
from xllm.server.errors import ClientDisconnected
from xllm.server.files import FileStore, owner_of
from xllm.server.metrics import Metrics
from xllm.server.serving import ChatService
from xllm.server.settings import Settings

T = TypeVar("T")


@dataclass
class Runtime:
    """Everything the routes need, filled in by the lifespan as the model loads."""

    settings: Settings
    metrics: Metrics
    api_keys: list[str] = field(default_factory=list)
    service: ChatService | None = None
    engine: EngineClient | None = None
    draining: bool = False
    load_error: str | None = None
    files: FileStore | None = None  # media handles (/v1/files), set by the app

    @property
    def ready(self) -> bool:
        return (
            self.service is not None
            and self.engine is not None
            and self.engine.alive
            and not self.draining
        )


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_service(runtime: RuntimeDep) -> ChatService:
    if runtime.draining:
        raise HTTPException(503, "the server is shutting down", headers={"Retry-After": "5"})
    if runtime.load_error is not None:
        raise HTTPException(503, f"the model failed to load: {runtime.load_error}")
    engine = runtime.engine
    if engine is not None and engine.started and not engine.alive:
        state = "not responding" if engine.wedged else "not running"
        raise HTTPException(503, f"the model worker is {state}", headers={"Retry-After": "5"})
    if not runtime.ready or runtime.service is None:
        raise HTTPException(503, "the model is still loading", headers={"Retry-After": "5"})
    return runtime.service


ServiceDep = Annotated[ChatService, Depends(get_service)]


async def get_files(runtime: RuntimeDep) -> FileStore:
    assert runtime.files is not None
    return runtime.files


FilesDep = Annotated[FileStore, Depends(get_files)]


async def get_owner(request: Request, runtime: RuntimeDep) -> str:
    """Whose media handles a request may see: its API key's (checked by ApiKeyMiddleware), or
    everyone's one owner when the server has no keys."""
    if not runtime.api_keys:
        return ""
    _, _, token = request.headers.get("authorization", "").partition(" ")
    return owner_of(token.strip())


OwnerDep = Annotated[str, Depends(get_owner)]


async def request_id(request: Request) -> str:
    return request.state.request_id


RequestIdDep = Annotated[str, Depends(request_id)]


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away first (for non-streaming replies)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected
