"""Media handles from the Python client and `xllm chat --file-id`, against the real server."""

from __future__ import annotations

import asyncio

import pytest

from tests.clients.test_client_cli import xllm_subprocess
from xllm.clients import AsyncXLLMClient, UploadedFile, XLLMClient, XLLMError

GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}


def test_upload_once_then_chat_by_id(server_url: str, png_bytes: bytes, tmp_path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes)
    with XLLMClient(server_url) as client:
        uploaded = client.upload(image)
        assert isinstance(uploaded, UploadedFile) and uploaded.id.startswith("file-")
        assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == (
            "red.png",
            len(png_bytes),
            "vision",
        )
        inline = client.chat("What is this? <image>", images=[png_bytes], **GREEDY)
        by_id = client.chat("What is this? <image>", file_ids=[uploaded.id], **GREEDY)
        assert by_id.text == inline.text
        again = client.chat("What is this? <image>", file_ids=[uploaded.id], **GREEDY)
        assert again.usage.cached_tokens == again.usage.prompt_tokens - 1  # the KV was kept
        streamed = client.chat_stream("What is this? <image>", file_ids=[uploaded.id], **GREEDY)
        assert "".join(part.delta for part in streamed) == inline.text

        command = ("chat", "--url", server_url, "--max-tokens", "6", "--temperature", "0")
        result = xllm_subprocess(*command, "--file-id", uploaded.id, "What is this? <image>")
        assert result.returncode == 0, result.stderr

        client.delete_file(uploaded.id)
        with pytest.raises(XLLMError) as gone:
            client.chat("What is this? <image>", file_ids=[uploaded.id], **GREEDY)
        assert gone.value.status == 404 and uploaded.id in gone.value.message
    result = xllm_subprocess(*command, "--file-id", uploaded.id, "What is this? <image>")
    assert result.returncode == 2 and "404" in result.stderr and uploaded.id in result.stderr


def test_async_upload(server_url: str, png_bytes: bytes) -> None:
    async def run() -> tuple[str, str]:
        async with AsyncXLLMClient(server_url) as client:
            uploaded = await client.upload(("red.png", png_bytes))
            reply = await client.chat("<image> and?", file_ids=[uploaded.id], **GREEDY)
            await client.delete_file(uploaded.id)
            inline = await client.chat("<image> and?", images=[png_bytes], **GREEDY)
            return reply.text, inline.text

    by_id, inline = asyncio.run(run())
    assert by_id == inline
