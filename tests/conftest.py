"""Shared fixtures: one tiny random model directory per session, and media made on the spot.

Everything is generated here (no downloads): the tiny model by `xllm.model.tiny.init_tiny`, images
with Pillow, audio with soundfile and videos with PyAV, all small enough for a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.media import make_mp4
from tests.servers import ServerProcess


class MediaMaker:
    """Writes small media files (PNG, WAV, MP4) or returns their bytes; all seeded."""

    SAMPLE_RATE = 16_000

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    # --- arrays and PIL objects ---
    @staticmethod
    def image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
        return Image.fromarray(pixels, "RGB")

    @staticmethod
    def waveform(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
        """A chirp plus noise (float32 mono); different seeds give different clips."""
        rng = np.random.default_rng(seed)
        t = np.arange(round(seconds * rate)) / rate
        freq = 200 + 100 * rng.random() + 300 * t / max(seconds, 1e-6)
        tone = 0.3 * np.sin(2 * np.pi * freq * t)
        return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)

    # --- files ---
    def png(self, name: str = "image.png", seed: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
        path = self.root / name
        self.image(seed, size).save(path, "PNG")
        return path

    def wav(self, name: str = "audio.wav", seconds: float = 1.0, seed: int = 0) -> Path:
        path = self.root / name
        sf.write(path, self.waveform(seconds, seed), self.SAMPLE_RATE, subtype="PCM_16")
        return path

    def mp4(
        self,
        name: str = "video.mp4",
        *,
        frames: int = 10,
        fps: int = 10,
        size: int = 64,
        audio: bool = False,
    ) -> Path:
        path = self.root / name
        path.write_bytes(self.mp4_bytes(frames=frames, fps=fps, size=size, audio=audio))
        return path

    def corrupt(self, name: str = "corrupt.png") -> Path:
        """A file that claims to be a PNG (valid signature) but is garbage after it."""
        path = self.root / name
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        return path

    @staticmethod
    def mp4_bytes(*, frames: int = 10, fps: int = 10, size: int = 64, audio: bool = False):
        return make_mp4(frames=frames, fps=fps, size=size, audio=audio)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> MediaMaker:
    """Session-wide media maker writing under one temporary directory."""
    return MediaMaker(tmp_path_factory.mktemp("media"))


@pytest.fixture
def media(tmp_path: Path) -> MediaMaker:
    """Per-test media maker writing under the test's own temporary directory."""
    return MediaMaker(tmp_path / "media")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny random-weight model directory (`xllm init-tiny`), made once per session.

    Treat it as read-only: tests that change a model directory copy or save to their own.
    """
    from xllm.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_llama_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a Llama LLM (the default model's family; what llama.cpp runs)."""
    from xllm.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny-llama-model"), llm="llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    """The tiny model loaded on the CPU in float32. Shared: do not change its weights."""
    from xllm.model.checkpoint import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, tiny_model_dir) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(*flags, model_dir=..., ready=200) -> a running ServerProcess (stopped later)."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(
        *flags: str, model_dir: Path | None = tiny_model_dir, ready: int | None = 200, env=None
    ):
        server = ServerProcess(model_dir, log_dir, *flags, env=env)
        started.append(server)
        if ready is not None:
            server.wait_ready(expect=ready)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test that used a server process gets that server's log in its report (CI keeps
    only the report, never the temporary directory the log was written to)."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, ServerProcess):
                report.sections.append((f"server log ({value.url})", value.log_text()))
    return report
