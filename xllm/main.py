"""The `xllm` command: one parser; each subcommand is registered by the package that owns it.

Subcommand modules define `register(subparsers)` and keep heavy imports (torch, transformers)
inside their handlers, so `xllm --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from xllm import __version__

COMMAND_MODULES = (
    "xllm.model.cli",
    "xllm.server.cli",
    "xllm.clients.chat_cli",
    "xllm.model.train.cli",
    "xllm.clients.bench",
)


class UserError(Exception):
    """A mistake the user can fix (bad file, bad flag value): one line on stderr, exit code 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user's input was wrong", mapped to exit code 2.

    Only modules already imported are consulted: an error of a type from a module that was never
    loaded cannot have been raised, and importing the model stack here would cost seconds.
    """
    found: list[type[BaseException]] = [UserError]
    for module, name in (
        ("xllm.model.config", "ModelConfigError"),
        ("xllm.model.media", "MediaError"),
        ("xllm.model.prompt", "PromptError"),
    ):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xllm", description="X-LLM multimodal chat: models, training and an inference server."
    )
    parser.add_argument("--version", action="version", version=f"xllm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def run_command(name: str, run: Callable[[], int | None]) -> int:
    """Run a command: user errors become one line and exit code 2, Ctrl-C exit code 130."""
    try:
        return int(run() or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, user_error_types()):
            print(f"xllm {name}: error: {exc}", file=sys.stderr)
            return 2
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.func(args))
