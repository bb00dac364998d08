"""`serve`: uvicorn, with a SIGTERM that drains and a watchdog for the model worker."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from xllm.server.app import create_app
from xllm.server.deps import Runtime
from xllm.server.lifecycle import drain, set_torch_threads
from xllm.server.logs import setup_logging
from xllm.server.settings import Settings

log = logging.getLogger("xllm.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM drains: /ready and new requests answer 503, running requests
    finish (up to the drain deadline), then the process exits 0."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._draining = False
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.runtime.draining = True
        log.info("SIGTERM: draining", extra={"deadline_s": self.runtime.settings.drain_timeout})
        threading.Thread(target=self._drain_then_exit, daemon=True).start()

    def _drain_then_exit(self) -> None:
        if self.runtime.engine is not None:
            drain(self.runtime.engine, self.runtime.settings.drain_timeout)
        self.should_exit = True

    def watch_worker(self) -> None:
        """A dead or wedged model worker cannot recover in-process: exit 3 for the supervisor."""
        while not self.should_exit:
            engine = self.runtime.engine
            if engine is not None and engine.wedged:
                log.error(
                    "model worker stalled; exiting so the supervisor restarts the server",
                    extra={"stalled_s": round(engine.stalled_for, 1)},
                )
                engine.abandon("the model worker stopped responding; the server is restarting")
                self.exit_code = 3
                self.should_exit = True
                return
            if engine is not None and engine.dead is not None:
                log.error("model worker died; exiting so the supervisor restarts the server")
                self.exit_code = 3
                self.should_exit = True
                return
            threading.Event().wait(0.5)


def serve(settings: Settings) -> int:
    setup_logging(settings.log_format)
    set_torch_threads(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.runtime)
    threading.Thread(target=server.watch_worker, daemon=True, name="xllm-watchdog").start()
    server.run()
    return server.exit_code
