"""`xllm serve`: flags override `XLLM_*` environment variables (see Settings)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xllm.model.config import QUANTIZE_CHOICES

# flag -> (type, help); every flag defaults to None so that unset flags leave env/defaults alone.
_FLAGS: dict[str, tuple[type, str]] = {
    "--model": (Path, "model directory (default: the built-in demo model)"),
    "--host": (str, "bind address (default 127.0.0.1)"),
    "--port": (int, "port (default 8000)"),
    "--max-batch": (int, "sequences decoding together = KV slots (default 32)"),
    "--max-queue": (int, "requests waiting beyond --max-batch before 429 (default 64)"),
    "--max-model-len": (int, "context per KV slot (default: the model's, at most 8192)"),
    "--prefill-chunk": (int, "prompt positions per prefill step (default 512)"),
    "--default-max-tokens": (int, "max_tokens when a request gives none (default 512)"),
    "--encoder-cache-mb": (int, "encoder output cache size (default 256)"),
    "--api-key": (str, "require 'Authorization: Bearer KEY' on /chat and /v1/*"),
    "--api-key-file": (Path, "file with accepted API keys, one per line"),
    "--cors-origins": (str, "comma-separated origins allowed by CORS (default: CORS off)"),
    "--max-upload-mb": (float, "largest request body (default 50)"),
    "--max-image-pixels": (int, "largest image, width x height (default 40000000)"),
    "--max-audio-seconds": (float, "longest audio (default 600)"),
    "--max-video-seconds": (float, "longest video (default 600)"),
    "--max-media-per-request": (int, "media items per request (default 16)"),
    "--request-timeout": (float, "seconds before a request ends with an error (default: none)"),
    "--allow-remote-media": (str, "comma-separated hosts whose http(s) media URLs may be fetched"),
    "--drain-timeout": (float, "seconds SIGTERM lets running requests finish (default 30)"),
    "--stall-timeout": (
        float,
        "seconds one engine step may run before the worker counts as wedged: /ready 503 and "
        "exit code 3 (default 300; 0: never; raise it for big models on CPU)",
    ),
    "--media-workers": (int, "threads decoding media (default 2)"),
    "--torch-threads": (int, "model worker threads on the CPU (default: cores - 1)"),
    "--kv-cache-memory-gb": (
        float,
        "memory for the KV cache in GiB; sizes the KV slots, at most --max-batch (default: on "
        "the CPU a quarter of the memory available at start-up)",
    ),
    "--gpu-memory-utilization": (
        float,
        "CUDA: share of the GPU's memory to use (weights, activations, KV cache), e.g. 0.9; "
        "sizes the KV slots, at most --max-batch (default: --max-batch slots; not on the CPU)",
    ),
}
_CHOICES = {
    "--quantize": QUANTIZE_CHOICES,
    "--device": ("auto", "cpu", "cuda"),
    "--dtype": ("auto", "float32", "bfloat16", "float16"),
    "--log-format": ("json", "text"),
    "--compile": ("on", "off"),  # torch.compile the decode step (default: on for CUDA only)
    "--engine": ("process", "thread"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the HTTP server (POST /chat, OpenAI-compatible /v1/chat/completions)",
        description="Every flag can also be set as an environment variable: --max-batch is "
        "XLLM_MAX_BATCH, and so on. Flags win.",
    )
    for flag, (kind, text) in _FLAGS.items():
        serve.add_argument(flag, type=kind, default=None, help=text)
    for flag, choices in _CHOICES.items():
        serve.add_argument(flag, choices=choices, default=None)
    serve.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace):  # -> Settings (import kept lazy)
    from pydantic import ValidationError

    from xllm.main import UserError
    from xllm.server.settings import Settings

    overrides = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag in (*_FLAGS, *_CHOICES)
    }
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"invalid settings: {problems}") from None


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.engine == "process":
        start_engine_forkserver()
    from xllm.server.serve import serve

    return serve(settings)


def start_engine_forkserver() -> None:
    """Start the process the engine will be forked from, importing torch and the engine there
    while this process imports the server (the two imports take seconds each: in sequence they
    would double the start-up time). Forking from it, unlike from this process, is safe: it has
    no threads and has not touched CUDA."""
    import multiprocessing
    import multiprocessing.forkserver

    multiprocessing.set_forkserver_preload(["xllm.server.engine.process"])
    multiprocessing.forkserver.ensure_running()
