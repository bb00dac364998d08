"""The shared server for the HTTP tests, and media to send it."""

from __future__ import annotations

import pytest

from tests.media import make_mp4, make_png, make_wav
from tests.servers import InProcessServer, ServerProcess


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared server: default settings except small upload and media-count limits."""
    return start_server("--max-upload-mb", "4", "--max-media-per-request", "4")


@pytest.fixture(scope="session")
def media_bytes() -> dict[str, bytes]:
    return {"png": make_png(), "wav": make_wav(), "mp4": make_mp4()}


@pytest.fixture(scope="module")
def busy(tiny_model):
    """4 KV slots + a queue of 8; used by the overload, disconnect and fault tests."""
    with InProcessServer(tiny_model, max_batch=4, max_queue=8, max_model_len=512) as server:
        yield server
