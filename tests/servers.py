"""The test harnesses: `xllm serve` as a real subprocess (ServerProcess), the app under uvicorn in
a thread of the test process (InProcessServer: a test can reach into its engine), one wait helper
and one metrics reader."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn

from tests.server.faults import inject_faults
from xllm.server.app import create_app
from xllm.server.serve import DrainingServer
from xllm.server.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    condition: Callable[[], object], timeout: float = 30, what: str = "", interval: float = 0.02
) -> None:
    """Poll `condition` until it is true; past `timeout` seconds fail the test, naming `what`.

    The timeout is only a bound on a hang, never a measurement: tests pass at any machine speed.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)


def read_metric(text: str, name: str, **labels: str) -> float:
    """The value of `name{labels}` in a Prometheus text exposition; 0 when it is absent.

    A labelled series exists only once observed, so absent and zero read the same. With no
    labels given, the first series of that name counts.
    """
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (not labels or sample.labels == labels):
                return float(sample.value)
    return 0.0


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
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log_text()}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == expect
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, timeout, f"/ready {expect}", interval=0.2)
        except AssertionError as exc:
            raise TimeoutError(f"{exc}:\n{self.log_text()}") from None

    def log_text(self, whole: bool = False) -> str:
        """The server's log so far (its last 5,000 characters unless `whole`)."""
        self.log.flush()
        text = self.log_path.read_text()
        return text if whole else text[-5000:]

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics: `name` with exactly these labels (0 when not yet recorded)."""
        return read_metric(httpx.get(f"{self.url}/metrics", timeout=5).text, name, **labels)

    def engine_pid(self) -> int:
        """The engine process's pid, from the server's "model ready" log line."""
        log = self.log_text(whole=True)
        lines = [json.loads(line) for line in log.splitlines() if "model ready" in line]
        assert lines and lines[0]["engine"] == "process", self.log_text()
        return lines[0]["engine_pid"]

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


class InProcessServer:
    """The app (given an already loaded model) under uvicorn in a thread, on 127.0.0.1."""

    def __init__(self, model, *, watchdog: bool = True, **settings) -> None:
        settings.setdefault("api_key", None)  # an XLLM_API_KEY in the environment must not leak in
        self.settings = Settings(host="127.0.0.1", **settings)
        self.app = create_app(self.settings, model=model)
        self.runtime = self.app.state.runtime
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            timeout_graceful_shutdown=1,
        )
        self.server = DrainingServer(config, self.runtime)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.watchdog = threading.Thread(
            target=self.server.watch_worker, name="test-watchdog", daemon=True
        )
        self._watch = watchdog

    @property
    def engine(self):
        return self.runtime.engine

    def start_watchdog(self) -> None:
        self.watchdog.start()

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        if self._watch:
            self.start_watchdog()
        wait_until(self._ready, 60, "the in-process server to be ready")
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        return read_metric(httpx.get(f"{self.url}/metrics", timeout=5).text, name, **labels)

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            inject_faults(self.engine, None)
        self.server.should_exit = True
        self.thread.join(30)

    def wait_exit(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()
