"""Python clients for the xllm server (`XLLMClient`, `AsyncXLLMClient`) and the `xllm chat` command.

Names are imported on first use, so that `xllm --help` (which imports `xllm.clients.chat_cli`)
does not pay for httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xllm.clients.client import (
        AsyncXLLMClient,
        ChatResult,
        ModelInfo,
        ServerStatus,
        SSEDecoder,
        SSEEvent,
        StreamDelta,
        Transcription,
        TranscriptSegment,
        UploadedFile,
        Usage,
        XLLMClient,
        XLLMConnectionError,
        XLLMError,
    )

__all__ = [
    "AsyncXLLMClient",
    "ChatResult",
    "ModelInfo",
    "SSEDecoder",
    "SSEEvent",
    "ServerStatus",
    "StreamDelta",
    "TranscriptSegment",
    "Transcription",
    "UploadedFile",
    "Usage",
    "XLLMClient",
    "XLLMConnectionError",
    "XLLMError",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("xllm.clients.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
