"""`xllm serve`: flags override `XLLM_*` environment variables (see Settings).

The flags are generated from `Settings`' fields, so a setting, its default and its help live in
one place: field `max_batch` is `--max-batch` (env var `XLLM_MAX_BATCH`), its type the field's
(a Literal gives choices, a bool `on`/`off`), its help the field's description.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic.fields import FieldInfo


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _plain_type(annotation: Any) -> Any:
    """The annotation without Optional / Annotated around it."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            others = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = others[0]
        else:
            return annotation


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    default = field.get_default(call_default_factory=True)
    if "default" in text or default in (None, [], ""):
        return text
    if isinstance(default, bool):
        default = "on" if default else "off"
    return f"{text} (default {default})" if text else f"default {default}"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; every flag defaults to None, so that unset flags leave the
    environment and the defaults alone."""
    from xllm.server.settings import Settings

    for name, field in Settings.model_fields.items():
        kind = _plain_type(field.annotation)
        options: dict[str, Any] = {"default": None, "help": _help(field)}
        if typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        elif kind is bool:
            options["choices"] = ("on", "off")
        elif kind in (int, float, Path):
            options["type"] = kind
        elif kind in (str, SecretStr) or typing.get_origin(kind) is list:
            options["type"] = str  # a list: comma-separated, split by Settings
        else:
            raise TypeError(f"Settings.{name}: no flag for {kind!r}")
        parser.add_argument(flag_name(name), **options)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the HTTP server (POST /chat, OpenAI-compatible /v1/chat/completions)",
        description="Every flag can also be set as an environment variable: --max-batch is "
        "XLLM_MAX_BATCH, and so on. Flags win.",
    )
    add_settings_arguments(serve)
    serve.set_defaults(func=run_serve)


def settings_from_args(args: argparse.Namespace):  # -> Settings (import kept lazy)
    from pydantic import ValidationError

    from xllm.main import UserError
    from xllm.server.settings import Settings

    overrides = {name: getattr(args, name) for name in Settings.model_fields}
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
