"""Faults: a failed step fails its requests only; a dead or wedged worker exits 3; drain."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading

import httpx
import pytest

from tests.media import make_png
from tests.server.faults import inject_faults
from tests.server.reliability import (
    assert_error,
    decoding,
    long_stream,
    ready_and_idle,
    stream,
)
from tests.servers import InProcessServer, wait_until


class Once:
    """A fault injector: raise `error` at the next step named `where`, then stay quiet."""

    def __init__(self, where: str, error: BaseException | None = None) -> None:
        self.where = where
        self.error = error or RuntimeError(f"injected {where} fault")
        self.fired = threading.Event()

    def __call__(self, where: str) -> None:
        if where == self.where and not self.fired.is_set():
            self.fired.set()
            raise self.error


def test_an_engine_fault_fails_only_its_step_and_the_server_goes_on(busy, tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="xllm.engine")
    engine = busy.engine
    headers = {"X-Request-ID": "fault-victim-1"}

    async def main():
        async with httpx.AsyncClient(base_url=busy.url, timeout=60) as client:
            # A prefill fault fails the request being prefilled; a running stream is untouched.
            running = asyncio.create_task(stream(client, data=long_stream(150, prompt="bystander")))
            while not decoding(engine):  # past its own prefill
                await asyncio.sleep(0.005)
            inject_faults(engine, Once("prefill"))
            r = await client.post(
                "/chat", data={"prompt": "victim", "max_tokens": "4"}, headers=headers
            )
            assert_error(r, 500, words=("prefill failed", "injected prefill fault"))
            status, _, events = await running
            assert status == 200 and events[-1] == "[DONE]"
            assert json.loads(events[-2])["usage"]["completion_tokens"] == 150

            # A decode fault mid-stream: an explicit error event, then [DONE].
            injector = Once("decode")
            task = asyncio.create_task(stream(client, data=long_stream(300, prompt="mid-stream")))
            while engine.num_running < 1:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            inject_faults(engine, injector)
            status, _, events = await task
            assert status == 200 and events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == 500 and "decode step failed" in error["message"]

            # An encoder fault: the media request fails with a clear 500; a text one is fine.
            inject_faults(engine, Once("encode"))
            files = [("image", ("a.png", make_png(), "image/png"))]
            r = await client.post(
                "/chat", data={"prompt": "<image>", "max_tokens": "2"}, files=files
            )
            assert_error(r, 500, words=("media encoding failed",))
            r = await client.post("/chat", data={"prompt": "after", "max_tokens": "3"})
            assert r.status_code == 200

    asyncio.run(main())
    ready_and_idle(busy)
    # The engine's log names the request it failed (the id the client gave).
    failed = [rec for rec in caplog.records if rec.getMessage() == "requests failed"]
    assert any(rec.request_ids == ["fault-victim-1"] and rec.status == 500 for rec in failed)


def test_nan_logits_and_runaway_sampling_parameters_fail_only_their_request(busy, tiny_model):
    head = tiny_model.llm.lm_head
    original = head.forward
    url = f"{busy.url}/chat"
    head.forward = lambda x: original(x) * float("inf")
    try:
        r = httpx.post(url, data={"prompt": "x", "max_tokens": "3"}, timeout=30)
        assert_error(r, 500, words=("NaN or infinite logits",))
    finally:
        head.forward = original
    assert httpx.get(f"{busy.url}/ready").status_code == 200

    # Finite logits, but the request's own parameters make the probabilities overflow: a 400
    # for that request (it used to kill the model worker), and the stream beside it goes on.
    async def main():
        async with httpx.AsyncClient(base_url=busy.url, timeout=60) as client:
            beside = asyncio.create_task(
                stream(client, data=long_stream(60, temperature="0.8", seed="1"))
            )
            bad = [
                {"temperature": "1e-320", "max_tokens": "4"},
                # Fails mid-batch at the first step where a token already sampled has a positive
                # logit (divided by 1e-300: infinite). A negative one is multiplied instead and
                # stays finite, so each step fails with probability ~1/2 on a random model: 16
                # tokens (min_tokens keeps a sampled EOS from ending it first) make a pass ~2^-100.
                {
                    "temperature": "1",
                    "repetition_penalty": "1e-300",
                    "min_tokens": "16",
                    "max_tokens": "16",
                },
            ]
            for params in bad:
                r = await client.post("/chat", data={"prompt": "x", **params})
                assert_error(r, 400, words=("sampling failed",))
            status, _, events = await beside
            assert status == 200 and json.loads(events[-2])["usage"]["completion_tokens"] == 60

    asyncio.run(main())
    ready_and_idle(busy)


class WorkerKilled(BaseException):
    """Not an Exception: gets past the per-step handlers and kills the worker thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_turns_ready_503_and_the_process_exits_3(tiny_model):
    with InProcessServer(tiny_model, watchdog=False, max_model_len=256) as server:

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                task = asyncio.create_task(stream(client, data=long_stream(200)))
                while server.engine.num_running < 1:
                    await asyncio.sleep(0.005)
                inject_faults(server.engine, Once("decode", WorkerKilled()))
                return await task

        status, _, events = asyncio.run(main())
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == 500  # told, not dropped
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "model worker is down"
        assert_error(httpx.post(f"{server.url}/chat", data={"prompt": "hi"}), 503)
        server.start_watchdog()
        assert server.wait_exit(10)
        assert server.server.exit_code == 3


def test_a_wedged_worker_is_detected_its_requests_told_and_the_process_exits_3(tiny_model):
    release = threading.Event()

    def hang(where: str) -> None:
        if where == "decode":
            release.wait(60)

    with InProcessServer(tiny_model, watchdog=False, stall_timeout=1, max_model_len=256) as server:
        try:

            async def main():
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                    task = asyncio.create_task(stream(client, data=long_stream(200)))
                    while server.engine.num_running < 1:
                        await asyncio.sleep(0.005)
                    inject_faults(server.engine, hang)
                    await asyncio.to_thread(
                        wait_until, lambda: server.engine.wedged, what="the worker to be wedged"
                    )
                    ready = await client.get("/ready")
                    assert ready.status_code == 503
                    assert ready.json()["status"] == "model worker is not responding"
                    r = await client.post("/chat", data={"prompt": "hi"})
                    assert_error(r, 503, words=("not responding",))
                    server.start_watchdog()
                    return await task

            status, _, events = asyncio.run(main())
            assert status == 200 and events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == 503 and "stopped responding" in error["message"]
            wait_until(lambda: server.server.exit_code == 3, what="exit code 3")
        finally:
            release.set()
        assert server.wait_exit(15)


def test_sigterm_past_the_drain_deadline_ends_streams_with_an_error_then_exits_0(tiny_model):
    """test_errors.py covers SIGTERM with streams finishing in time; here the deadline passes.
    The signal is delivered the way uvicorn's handler does (handle_exit), since uvicorn only
    installs signal handlers on the main thread."""
    with InProcessServer(tiny_model, drain_timeout=1, max_model_len=2048) as server:

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                task = asyncio.create_task(stream(client, data=long_stream(2000)))
                while server.engine.num_running < 1:
                    await asyncio.sleep(0.005)
                server.server.handle_exit(signal.SIGTERM, None)
                while (await client.get("/ready")).status_code != 503:  # draining has begun
                    await asyncio.sleep(0.01)
                assert_error(await client.post("/chat", data={"prompt": "late"}), 503)
                return await task

        status, _, events = asyncio.run(main())
        assert status == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "drain deadline" in error["message"]
        assert server.wait_exit(15) and server.server.exit_code == 0
