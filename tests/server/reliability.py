"""Helpers of the reliability tests (test_auth, test_limits, test_remote_media, test_overload,
test_faults, test_logs_and_memory): error bodies, streams, memory readings, media made to lie.

Two kinds of server are used, both on loopback only:
- the shared `xllm serve` subprocess (`server` fixture, tests/server/conftest.py), where the
  process's own memory (/proc/PID/status) or log file is what a test looks at;
- `InProcessServer` (tests/servers.py): the real app under the real uvicorn in a thread of the
  test process, so a test can reach into the engine (fault injection, a wedged worker) without
  any test-only switch in the server's code paths.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.media import make_wav
from tests.servers import InProcessServer, wait_until

MB = 2**20


# --- harness -------------------------------------------------------------------------------------
def assert_error(r: httpx.Response, *statuses: int, words: tuple[str, ...] = ()) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    body = r.json()["error"]
    assert set(body) == {"message", "type", "code"} and body["code"] == r.status_code
    assert body["message"].strip()
    for word in words:
        assert word in body["message"], body["message"]
    return body


def sse_data(lines: list[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


async def stream(
    client: httpx.AsyncClient, path: str = "/chat", **kwargs
) -> tuple[int, dict, list]:
    """(status, headers, SSE data payloads or [error body])."""
    async with client.stream("POST", path, **kwargs) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, dict(r.headers), [r.json()]
        return (
            200,
            dict(r.headers),
            [line[6:] async for line in r.aiter_lines() if line[:6] == "data: "],
        )


def long_stream(tokens: int, **extra) -> dict:
    return {
        "prompt": "go on",
        "stream": "true",
        "max_tokens": str(tokens),
        "ignore_eos": "true",
        **extra,
    }


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM (peak RSS) to the current RSS (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def decoding(engine) -> int:
    """Requests past their prefill (a racy read of the worker's list, fine for polling)."""
    return sum(entry.phase.value == "decode" for entry in list(engine.scheduler.running))


def idle(server) -> None:
    """Wait until no request runs or waits (an InProcessServer or a ServerProcess)."""
    wait_until(
        lambda: (
            server.metric("xllm_num_requests_running") == 0
            and server.metric("xllm_num_requests_waiting") == 0
        ),
        what="the server to be idle",
    )


def ready_and_idle(server: InProcessServer) -> None:
    wait_until(lambda: server.engine.num_in_system == 0, what="the engine to be idle")
    assert httpx.get(f"{server.url}/ready").status_code == 200


# --- media made to lie ---------------------------------------------------------------------------
def png_bomb(side: int = 16_000) -> bytes:
    """A valid ~30 KB PNG of side x side 1-bit pixels: 256 M pixels (0.75 GB as RGB) if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + side // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wav_claiming(data_bytes: int, real_seconds: float = 0.5) -> bytes:
    """A 16 kHz mono WAV whose RIFF and data sizes claim `data_bytes` of samples."""
    wav = bytearray(make_wav(real_seconds))
    at = wav.index(b"data")
    wav[4:8] = struct.pack("<I", min(data_bytes + at, 2**32 - 1))
    wav[at + 4 : at + 8] = struct.pack("<I", data_bytes)
    return bytes(wav)


def wide_mp4(width: int = 4112, height: int = 16) -> bytes:
    import io

    import av
    import numpy as np

    codec = "libx264" if "libx264" in av.codecs_available else "h264"  # as tests/media.py
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream(codec, rate=2)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(
                np.zeros((height, width, 3), np.uint8), format="rgb24"
            )
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return buffer.getvalue()


def post_media(server, field: str, data: bytes, name: str = "f", **extra) -> httpx.Response:
    return httpx.post(
        f"{server.url}/chat",
        data={"prompt": "what is it?", "max_tokens": "2", **extra},
        files=[(field, (name, data, "application/octet-stream"))],
        timeout=60,
    )


def peak_growth_mb(server, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """The reply and how far the server's peak RSS rose above its RSS before the request."""
    pid = server.process.pid
    reset_peak_rss(pid)
    before = rss_kb(pid)
    r = send()
    return r, (rss_kb(pid, "VmHWM") - before) / 1024
