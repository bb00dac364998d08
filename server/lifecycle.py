"""The engine's life in the server: load the model and start the engine and the chat service
(in the lifespan's background), and drain it at shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from xllm.model.config import ModelConfigError
from xllm.server.deps import Runtime
from xllm.server.settings import Settings

if TYPE_CHECKING:
    from xllm.model.xllm import XLLM
    from xllm.server.engine.contract import EngineClient

log = logging.getLogger("xllm.server")


async def start_model(runtime: Runtime, model: XLLM | None, executor: ThreadPoolExecutor) -> None:
    """Load the model and start the engine: in a child process, or in a thread of this one
    (`--engine thread`, or a `model` object given by an embedding application). A failure is
    kept in `runtime.load_error` (/ready and the routes answer 503 with it)."""
    from xllm.model.checkpoint import default_model_dir, load_model
    from xllm.model.preprocess import MediaPreparer
    from xllm.server.engine.process import EngineProcess, EngineSpec
    from xllm.server.engine.worker import Engine
    from xllm.server.remote_media import RemoteMediaFetcher
    from xllm.server.serving import ChatService

    s = runtime.settings
    config = s.engine_config()
    engine: EngineClient
    try:
        if model is not None:
            preparer, engine = model.preparer, Engine(model, config, runtime.metrics)
        else:
            model_dir = s.model or await asyncio.to_thread(default_model_dir)
            log.info(
                "loading model",
                extra={"model": str(model_dir), "quantize": s.quantize, "engine": s.engine},
            )
            preparer = await asyncio.to_thread(MediaPreparer.from_pretrained, model_dir)
            if s.engine == "process":
                spec = EngineSpec(
                    model_dir,
                    s.device,
                    s.dtype,
                    s.torch_quantize,
                    config,
                    cpu_threads(s),
                    s.log_format,
                )
                engine = EngineProcess(spec, runtime.metrics)
            else:
                model = await asyncio.to_thread(
                    load_model, model_dir, device=s.device, dtype=s.dtype, quantize=s.torch_quantize
                )
                engine = Engine(model, config, runtime.metrics)
        fetcher = RemoteMediaFetcher(s.allow_remote_media, s.max_upload_bytes)
        await asyncio.to_thread(engine.start)
        runtime.engine = engine
        if runtime.files is not None:  # gone handles' encoder outputs leave the engine's pins
            runtime.files.on_release = engine.unpin_media
        runtime.service = ChatService(
            preparer,
            engine,
            s.serving_limits(),
            executor,
            fetcher,
            preparer.config.name,
            runtime.metrics,
            runtime.files,
        )
        log.info(
            "model ready",
            extra={
                "model": preparer.config.name,
                "modalities": list(preparer.modalities),
                "engine": "thread" if isinstance(engine, Engine) else "process",
                "engine_pid": engine.pid,
                "max_batch": engine.config.max_batch,
                "max_model_len": engine.max_model_len,
                "kv_cache_mb": round(engine.kv_cache_bytes / 2**20, 1),
            },
        )
    except ModelConfigError as exc:  # the user's to fix, and the message says how
        runtime.load_error = str(exc)
        log.error("model failed to load: %s", exc)
    except Exception as exc:
        runtime.load_error = str(exc)
        log.exception("model failed to load")


def drain(engine: EngineClient, timeout: float) -> None:
    """Stop intake, let running requests finish up to `timeout`, then end the rest with an error."""
    engine.stop_intake()
    if not engine.join(timeout):
        engine.abort_all(f"the server is shutting down (drain deadline of {timeout:g} s passed)")
        engine.join(5)
    engine.shutdown()


def cpu_threads(settings: Settings) -> int | None:
    """Intra-op threads for the model on the CPU: leave a core to the event loop and the media
    pool (torch's one per core oversubscribes them). None on a GPU: torch's default."""
    import torch

    if settings.device == "cpu" or not torch.cuda.is_available():
        return settings.torch_threads or max(1, (os.cpu_count() or 2) - 1)
    return None


def set_torch_threads(settings: Settings) -> None:
    """Process-wide: this process's preprocessing, and the model when it runs in a thread."""
    import torch

    threads = cpu_threads(settings)
    if threads is not None:
        torch.set_num_threads(threads)
