"""`xllm chat`: ask a running xllm server one question, with files, and stream the answer.

Imports stay light here (no httpx, no torch): the client is imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="ask a running xllm server a question (with images, audio, video); stream the answer",
        description="Send one question to an xllm server's POST /chat and stream the answer to "
        "stdout. <image>, <audio>, <video> in the question mark where each file goes (in order); "
        "files without a placeholder go before the question.",
    )
    chat.add_argument("question", help="the question (one user turn)")
    chat.add_argument("--url", default=DEFAULT_URL, help=f"server address (default {DEFAULT_URL})")
    chat.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="API key sent as 'Authorization: Bearer KEY' (default: $XLLM_API_KEY)",
    )
    for kind in ("image", "audio", "video"):
        chat.add_argument(
            f"--{kind}",
            dest=f"{kind}s",
            action="append",
            default=[],
            type=Path,
            metavar="FILE",
            help=f"{kind} file (repeatable)",
        )
    chat.add_argument(
        "--file-id",
        dest="file_ids",
        action="append",
        default=[],
        metavar="ID",
        help="a media handle from POST /v1/files (repeatable; bound after the files of its kind)",
    )
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    chat.add_argument(
        "--max-tokens", type=int, default=None, metavar="N", help="longest answer, in tokens"
    )
    chat.add_argument(
        "--temperature", type=float, default=None, metavar="T", help="0 answers greedily"
    )
    chat.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed")
    chat.add_argument(
        "--response-format",
        default=None,
        metavar="json_object|FILE",
        help="answer in JSON: any object, or valid under the JSON schema in FILE",
    )
    chat.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for the server (default 600)",
    )
    chat.set_defaults(func=run_chat)


def _read_media(paths: list[Path]) -> list[tuple[str, bytes]]:
    from xllm.main import UserError

    media = []
    for path in paths:
        try:
            media.append((path.name, path.read_bytes()))
        except OSError as exc:
            raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from None
    return media


def _response_format(spec: str | None) -> dict[str, Any] | None:
    """--response-format as /chat's response_format (a JSON schema file read here)."""
    import json

    from xllm.main import UserError

    if spec is None:
        return None
    if spec == "json_object":
        return {"type": "json_object"}
    try:
        schema = json.loads(Path(spec).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--response-format: cannot read a JSON schema from '{spec}': {exc}"
        ) from None
    return {"type": "json_schema", "json_schema": {"name": Path(spec).stem, "schema": schema}}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_chat(args: argparse.Namespace) -> int:
    from xllm.clients.client import XLLMClient, XLLMConnectionError, XLLMError
    from xllm.main import UserError

    images, audios, videos = (_read_media(p) for p in (args.images, args.audios, args.videos))
    response_format = _response_format(args.response_format)
    prompt, messages = args.question, None
    if args.system is not None:
        prompt, messages = (
            None,
            [
                {"role": "system", "content": args.system},
                {"role": "user", "content": args.question},
            ],
        )
    api_key = args.api_key or os.environ.get("XLLM_API_KEY") or None
    out = sys.stdout
    wrote = False
    try:
        with XLLMClient(args.url, api_key=api_key, timeout=args.timeout) as client:
            stream = client.chat_stream(
                prompt,
                messages,
                images,
                audios,
                videos,
                args.file_ids,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed,
                response_format=response_format,  # type: ignore[typeddict-item]
            )
            for part in stream:
                if part.delta:
                    out.write(part.delta)
                    out.flush()
                    wrote = True
    except XLLMError as exc:
        if wrote:  # end the partial answer's line before the error goes to stderr
            out.write("\n")
            out.flush()
        if isinstance(exc, XLLMConnectionError):
            raise UserError(_one_line(exc.message)) from None
        raise UserError(_one_line(f"the server answered {exc}")) from None
    out.write("\n")
    out.flush()
    return 0
