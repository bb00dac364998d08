"""Real server processes (uvicorn via `xllm serve`) on a tiny model, and media to send them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.media import make_mp4, make_png, make_wav


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`xllm serve` in a subprocess, with its log in a file (read it when a test fails)."""

    def __init__(self, model_dir: Path | None, log_dir: Path, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        args = [
            sys.executable,
            "-m",
            "xllm",
            "serve",
            "--port",
            str(self.port),
            "--log-format",
            "json",
        ]
        if model_dir is not None:
            args += ["--model", str(model_dir)]
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [*args, *flags],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 60, expect: int = 200) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == expect:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-5000:]

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, tiny_model_dir) -> Iterator:
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


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared server: default settings except small upload and media-count limits."""
    return start_server("--max-upload-mb", "4", "--max-media-per-request", "4")


@pytest.fixture(scope="session")
def media_bytes() -> dict[str, bytes]:
    return {"png": make_png(), "wav": make_wav(), "mp4": make_mp4()}

