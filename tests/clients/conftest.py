"""A real xllm server on the tiny random model, once per session, for the client tests."""

from __future__ import annotations

import pytest

from tests.media import make_mp4, make_png, make_wav
from tests.servers import free_port


@pytest.fixture(scope="session")
def dead_url() -> str:
    """An address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def server_url(start_server) -> str:
    return start_server("--max-batch", "4").url


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    return make_png((32, 32), (200, 30, 30))


@pytest.fixture(scope="session")
def wav_bytes() -> bytes:
    """1 s of a 440 Hz sine at 16 kHz."""
    return make_wav()


@pytest.fixture(scope="session")
def mp4_bytes() -> bytes:
    """64x64, 10 frames at 10 fps: a square moving right, H.264 in MP4."""
    return make_mp4()
