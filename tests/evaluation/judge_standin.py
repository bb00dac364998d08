"""A deterministic judge on 127.0.0.1: POST /v1/chat/completions, OpenAI's reply shape.

The reply text comes from `review(content)` (default "8 6\\n..."); the first `busy` requests get
429 with Retry-After: 0, then `errors` requests get 500. Every request is counted and kept, and
the largest number in flight at once is recorded (`delay` seconds per reply makes overlap
visible).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def default_review(content: str) -> str:
    return "8 6\nAssistant 1 is more accurate; Assistant 2 misses details."


class JudgeStandIn:
    def __init__(
        self,
        review: Callable[[str], str] = default_review,
        *,
        busy: int = 0,
        errors: int = 0,
        delay: float = 0.0,
        status: int | None = None,
    ) -> None:
        self.review = review
        self.busy = busy
        self.errors = errors
        self.delay = delay
        self.status = status  # answer every request with this status (e.g. 401)
        self.calls = 0  # requests since the last reset()
        self.total = 0  # requests ever: the first `busy`, then `errors`, fail
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.starts: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> JudgeStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.bodies.clear()
            self.headers.clear()
            self.starts.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with judge._lock:
                    judge.calls += 1
                    judge.total += 1
                    number = judge.total
                    judge.bodies.append(body)
                    judge.headers.append(dict(self.headers))
                    judge.starts.append(time.monotonic())
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                time.sleep(judge.delay)
                # Out of flight before the answer is written: the client may send its next
                # request the moment it reads this one, before this thread runs on.
                with judge._lock:
                    judge.in_flight -= 1
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                elif judge.status is not None:
                    self._send(judge.status, {"error": {"message": "refused"}})
                elif number <= judge.busy:
                    self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                elif number <= judge.busy + judge.errors:
                    self._send(500, {"error": {"message": "oops"}})
                else:
                    text = judge.review(body["messages"][-1]["content"])
                    self._send(
                        200,
                        {
                            "id": f"chatcmpl-{number}",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body.get("model", "judge"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": 1,
                                "completion_tokens": 1,
                                "total_tokens": 2,
                            },
                        },
                    )

        return Handler
