"""A real xllm server on the tiny random model, once per session, for the client tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# One child process makes the tiny model and then serves it (saves a second torch import).
SERVER_SCRIPT = """
import sys
from xllm.model.tiny import init_tiny
from xllm.server.app import serve
from xllm.server.settings import Settings

model_dir, port = sys.argv[1], int(sys.argv[2])
init_tiny(model_dir)
sys.exit(serve(Settings(model=model_dir, port=port, log_format="text", max_batch=4)))
"""
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def dead_url() -> str:
    """An address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("xllm-client-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "server.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(work / "tiny"), str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_ready(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(
        f"the server was not ready in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}"
    )


# --- tiny media, made in memory ---
@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    import io

    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    image.paste((30, 30, 200), (8, 8, 24, 24))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def wav_bytes() -> bytes:
    """1 s of a 440 Hz sine at 16 kHz, 16-bit PCM WAV."""
    import io

    import numpy as np
    import soundfile as sf

    rate = 16_000
    t = np.arange(rate) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def mp4_bytes() -> bytes:
    """64x64, 10 frames at 10 fps: a square moving right, H.264 in MP4."""
    import io
    from fractions import Fraction

    import av
    import numpy as np

    codec = next((c for c in ("libx264", "h264", "mpeg4") if c in av.codecs_available), None)
    if codec is None:
        pytest.skip("PyAV has no H.264 or MPEG-4 encoder")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.time_base = Fraction(1, 10)
        for i in range(10):
            pixels = np.zeros((64, 64, 3), dtype=np.uint8)
            pixels[24:40, 4 + 4 * i : 20 + 4 * i] = (255, 255, 0)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()
