"""The engine in its own process (`xllm serve`'s default): the real server, the real child.

Failures of the child are produced from outside, as the operating system would: SIGKILL (an
out-of-memory kill) and SIGSTOP (a hang), on the child process found under the server's pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess, wait_until


def exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # exited, not yet reaped by its parent


def gone(pid: int, timeout: float) -> bool:
    try:
        wait_until(lambda: exited(pid), timeout, f"process {pid} to exit")
    except AssertionError:
        return False
    return True


class Stream(threading.Thread):
    """A long streaming request in the background; `events` are its SSE data payloads."""

    def __init__(self, url: str, tokens: int = 1800) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.tokens = tokens
        self.status = 0
        self.events: list[str] = []

    def run(self) -> None:
        data = {"prompt": "go on", "stream": "true", "max_tokens": str(self.tokens)}
        with httpx.stream("POST", f"{self.url}/chat", data={**data, "ignore_eos": "true"}) as r:
            self.status = r.status_code
            self.events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    def wait_running(self, server: ServerProcess) -> None:
        wait_until(lambda: server.metric("xllm_num_requests_running") >= 1, what="the stream")


@pytest.fixture
def fresh_server(start_server):
    """A server of its own (these tests kill its engine), tiny model, 2,048-token context."""
    return lambda *flags: start_server("--max-model-len", "2048", *flags)


def test_serve_runs_the_engine_in_a_child_process_that_ends_with_the_server(fresh_server):
    server = fresh_server()
    pid = server.engine_pid()
    assert pid != server.process.pid
    text = httpx.post(f"{server.url}/chat", data={"prompt": "hi", "max_tokens": "5"}).json()
    assert text["usage"]["completion_tokens"] == 5
    # Metrics are recorded in the child and counted here: the request shows in both families.
    assert server.metric("xllm_generated_tokens_total") >= 5
    assert server.metric("xllm_time_to_first_token_seconds_count") >= 1
    server.process.kill()  # no drain, no goodbye: the child sees its pipe close and exits
    server.process.wait(5)
    assert gone(pid, 10)


def test_engine_thread_keeps_the_model_in_the_server_process(fresh_server):
    server = fresh_server("--engine", "thread")
    ready = [json.loads(line) for line in server.log_text().splitlines() if "model ready" in line]
    assert ready[0]["engine"] == "thread" and ready[0]["engine_pid"] == server.process.pid
    reply = httpx.post(f"{server.url}/chat", data={"prompt": "hi", "max_tokens": "3"}).json()
    assert reply["usage"]["completion_tokens"] == 3


def test_a_killed_engine_process_fails_its_streams_and_the_server_exits_3(fresh_server):
    server = fresh_server()
    stream = Stream(server.url)
    stream.start()
    stream.wait_running(server)
    os.kill(server.engine_pid(), signal.SIGKILL)
    stream.join(20)
    assert stream.status == 200 and stream.events[-1] == "[DONE]"
    error = json.loads(stream.events[-2])["error"]
    assert error["code"] == 500 and "model worker failed" in error["message"]
    server.process.wait(15)  # the watchdog: the supervisor restarts a whole server
    assert server.process.returncode == 3
    assert "engine process exited" in server.log_text()


def test_a_hung_engine_process_is_detected_and_the_server_exits_3(fresh_server):
    server = fresh_server("--stall-timeout", "1")
    pid = server.engine_pid()
    stream = Stream(server.url)
    stream.start()
    stream.wait_running(server)
    os.kill(pid, signal.SIGSTOP)
    try:
        # The heartbeat stops: past --stall-timeout the engine counts as wedged, its requests are
        # told and the watchdog exits 3 (within half a second: too soon to poll /ready for the
        # 503 reliably; test_faults.py checks that answer with the watchdog held back).
        stream.join(20)
        error = json.loads(stream.events[-2])["error"]
        assert error["code"] == 503 and "stopped responding" in error["message"]
        server.process.wait(20)
        assert server.process.returncode == 3
        assert "model worker stalled" in server.log_text()
        assert gone(pid, 10)  # the server does not leave its stopped child behind
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_model_the_engine_process_cannot_load_is_a_clear_503(
    start_server, tiny_model_dir, tmp_path
):
    import shutil

    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / "broken"))
    for weights in (broken / "llm").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    server = start_server(model_dir=broken, ready=None)

    def status() -> str:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            return httpx.get(f"{server.url}/ready").json()["status"]
        return "loading"

    wait_until(lambda: status() != "loading", 60, "the load to end")
    assert status().startswith("model failed to load"), status()
    r = httpx.post(f"{server.url}/chat", data={"prompt": "hi"})
    assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    assert "model ready" not in server.log_text()


def test_a_cancelled_request_gives_its_place_back(tiny_model_dir):
    """A client that leaves mid-stream frees its place on this side too: the engine process
    says when it dropped the request (without it every disconnect would hold a place for good,
    and the server would end up answering 429 to everyone)."""
    import asyncio

    from tests.servers import wait_until
    from xllm.model.prompt import bind_media
    from xllm.model.sampling import SamplingParams
    from xllm.server.engine.config import EngineConfig
    from xllm.server.engine.events import EngineRequest, RequestHandle, TokenEvent
    from xllm.server.engine.process import EngineProcess, EngineSpec

    config = EngineConfig(max_batch=1, max_queue=0, max_model_len=256)
    engine = EngineProcess(EngineSpec(tiny_model_dir, "cpu", "auto", "none", config, 1, "text"))
    engine.start()

    async def stream_then_leave() -> None:
        engine.reserve()
        handle = RequestHandle("leaves", asyncio.get_running_loop())
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        messages = bind_media([("user", "go on")], [])
        engine.submit(EngineRequest("leaves", messages, [], params, True), handle)
        assert isinstance(await handle.next_event(), TokenEvent)
        handle.cancel()
        await asyncio.to_thread(
            wait_until, lambda: engine.num_in_system == 0, what="the place to be given back"
        )

    try:
        asyncio.run(stream_then_leave())
        engine.reserve()  # the one place is free again
        engine.release()
    finally:
        engine.shutdown()
