"""`xllm bench`: a load generator for a running xllm server, in the manner of `vllm bench serve`.

    xllm bench --url http://127.0.0.1:8000 --concurrency 16 --requests 128 --max-tokens 64 \\
        --mix image=1,audio=1,video=1,text=1 --json out.json
    xllm bench --url ... --request-rate 4 --requests 200          # Poisson arrivals (seeded)
    xllm bench --url ... --concurrency 16 --baseline --model DIR  # + naive HF `generate`

Every request is a streaming `POST /chat` with `ignore_eos=true`, greedy decoding and a fixed
`max_tokens`, so lengths are comparable across runs and servers. Media come from `--media-dir`
(by file extension) or are made in memory (PNG with Pillow, WAV with soundfile, MP4 with PyAV),
one distinct item per request so the server's encoder cache does not flatter the figures.

Measured per request, from the client's side: TTFT (request sent -> first SSE event), the
inter-token latencies (gaps between SSE events), TPOT ((end - first event) / (tokens - 1)) and
end-to-end latency; output tokens come from the final event's `usage.completion_tokens`.
Reported: p50/p95/p99 (and mean) of each, output tokens/s, requests/s and errors, as a table and
as JSON (`--json`).

`--baseline` sends the same requests (same prompts, same media) one at a time through HF
`generate` in this process (the model loaded from `--model`): media decoded and encoded, the
prompt embedded exactly as the server does, then `llm.generate(inputs_embeds=...)`. The report
then carries the ratios server/baseline for throughput and TTFT p50.

Only argparse is imported until the command runs (`xllm --help` stays instant).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xllm.model.config import QUANTIZE_CHOICES

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop
    from collections.abc import Callable

DEFAULT_URL = "http://127.0.0.1:8000"
KINDS = ("image", "audio", "video", "text")
DEFAULT_MIX = "image=1,audio=1,video=1,text=1"
EXTENSIONS = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"),
    "audio": (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus"),
    "video": (".mp4", ".mov", ".mkv", ".webm", ".avi"),
}
MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp4": "video/mp4",
}
PROMPTS = {
    "image": ("What is in the image?", "Describe the picture.", "What color is the shape?"),
    "audio": ("Transcribe the audio.", "What do you hear?", "请忠实地识别该语音。"),
    "video": ("Which way does the shape move?", "Describe the video.", "What happens here?"),
    "text": (
        "Large language models can read images, speech and video as if they were foreign "
        "languages. Explain how in a few sentences.",
        "Write a short story about a red circle that meets a green square.",
        "What is the quick brown fox known for? Answer at length.",
    ),
}
PERCENTILES = (50, 95, 99)


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="load-test a running xllm server (TTFT, ITL, TPOT, tokens/s), optionally against "
        "a naive HF generate baseline",
        description="Send streaming POST /chat requests (ignore_eos, fixed max_tokens) at a "
        "fixed concurrency or as Poisson arrivals, and report latency percentiles and "
        "throughput. With --baseline, the same requests also go one at a time through HF "
        "generate in this process.",
    )
    bench.add_argument("--url", default=DEFAULT_URL, help=f"server address (default {DEFAULT_URL})")
    load = bench.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help="requests in flight at once (default 1; with --request-rate: an upper bound)",
    )
    load.add_argument(
        "--request-rate",
        type=float,
        default=None,
        metavar="R",
        help="Poisson arrivals at R requests/s (seeded; 'inf': all at once)",
    )
    load.add_argument("--requests", type=int, default=64, metavar="N", help="measured requests")
    load.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="N",
        help="requests sent one by one before measuring, with their own media (default 1)",
    )
    load.add_argument(
        "--mix",
        default=DEFAULT_MIX,
        help=f"request kinds and their weights, e.g. image=2,text=1 (default {DEFAULT_MIX})",
    )
    load.add_argument("--max-tokens", type=int, default=64, metavar="N", help="per request")
    load.add_argument(
        "--media-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="take media from this folder, by extension (kinds it lacks are generated)",
    )
    load.add_argument("--seed", type=int, default=0, help="seeds media, kinds and arrivals")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    bench.add_argument(
        "--api-key", default=None, metavar="K", help="Bearer key (default: $XLLM_API_KEY)"
    )
    bench.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report")
    bench.add_argument("--label", default=None, help="free text stored in the JSON report")
    bench.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    base = bench.add_argument_group("baseline (naive HF generate, in this process)")
    base.add_argument("--baseline", action="store_true", help="also run the naive baseline")
    base.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the server's model directory (default: the built-in model)",
    )
    base.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    base.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    base.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none")
    base.add_argument(
        "--baseline-requests",
        type=int,
        default=None,
        metavar="N",
        help="send only the first N requests through the baseline (default: all)",
    )
    bench.set_defaults(func=run_bench)


# --- what is sent ---
@dataclass
class MediaItem:
    kind: str  # image | audio | video
    filename: str
    data: bytes


@dataclass
class BenchRequest:
    index: int
    kind: str  # image | audio | video | text
    prompt: str
    media: list[MediaItem] = field(default_factory=list)


def parse_mix(spec: str) -> dict[str, float]:
    """'image=2,text=1' -> normalised weights; ValueError naming the bad part."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"--mix: unknown kind '{kind}' (use {', '.join(KINDS)})")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"--mix: '{part}' is not kind=weight") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--mix: the weight of '{kind}' must be a number >= 0")
        weights[kind] = weights.get(kind, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("--mix: give at least one kind with a positive weight")
    return {k: w / total for k, w in weights.items() if w > 0}


def kind_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Exactly n requests split by the mix (largest remainder), so runs are comparable."""
    exact = {k: w * n for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    rest = n - sum(counts.values())
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:rest]:
        counts[k] += 1
    return counts


def media_files(media_dir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {kind: [] for kind in EXTENSIONS}
    for path in sorted(media_dir.iterdir()):
        for kind, suffixes in EXTENSIONS.items():
            if path.is_file() and path.suffix.lower() in suffixes:
                found[kind].append(path)
    return found


def build_requests(
    n: int, mix: dict[str, float], seed: int, media_dir: Path | None = None, offset: int = 0
) -> list[BenchRequest]:
    """n requests, kinds in the mix's proportions in a seeded order, each with its own media."""
    import random

    rng = random.Random(seed)
    kinds = [k for k, c in kind_counts(mix, n).items() for _ in range(c)]
    rng.shuffle(kinds)
    files = media_files(media_dir) if media_dir is not None else {}
    used = {kind: 0 for kind in EXTENSIONS}
    requests = []
    for i, kind in enumerate(kinds):
        prompt = PROMPTS[kind][rng.randrange(len(PROMPTS[kind]))]
        request = BenchRequest(offset + i, kind, prompt)
        if kind != "text":
            pool = files.get(kind) or []
            if pool:
                path = pool[used[kind] % len(pool)]
                request.media.append(MediaItem(kind, path.name, path.read_bytes()))
            else:
                request.media.append(make_media(kind, seed * 1_000_003 + offset + i))
            used[kind] += 1
        requests.append(request)
    return requests


# --- media made in memory ---
def make_media(kind: str, seed: int) -> MediaItem:
    if kind == "image":
        return MediaItem("image", f"bench-{seed}.png", make_png(seed))
    if kind == "audio":
        return MediaItem("audio", f"bench-{seed}.wav", make_wav(seed))
    return MediaItem("video", f"bench-{seed}.mp4", make_mp4(seed))


def make_png(seed: int, size: int = 224) -> bytes:
    """A coloured shape on a coloured background (distinct per seed, a few kB)."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    box = (x, y, x + size // 3 + rng.randrange(size // 4), y + size // 3 + rng.randrange(size // 4))
    fill = tuple(rng.randrange(256) for _ in range(3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_wav(seed: int, seconds: float = 2.0, rate: int = 16_000) -> bytes:
    """A chirp with noise, 16 kHz mono PCM-16."""
    import io

    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    freq = 200 + 300 * rng.random() + 200 * t / seconds
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.shape)
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def make_mp4(seed: int, seconds: int = 2, fps: int = 4, size: int = 64) -> bytes:
    """A square moving over a gradient (H.264, or MPEG-4 where there is no H.264 encoder)."""
    import io
    import random
    from fractions import Fraction

    import av
    import numpy as np

    rng = random.Random(seed)
    codec = next(c for c in ("libx264", "h264", "mpeg4") if c in av.codecs_available)
    color = [rng.randrange(256) for _ in range(3)]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * fps):
            pixels = np.zeros((size, size, 3), np.uint8)
            pixels[..., rng.randrange(3)] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
            x = (i * 6) % (size - 16)
            pixels[24:40, x : x + 16] = color
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


# --- what comes back ---
@dataclass
class RequestResult:
    index: int
    kind: str
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # perf_counter when sent
    ttft: float | None = None  # seconds to the first streamed event
    e2e: float | None = None  # seconds to the final event
    itl: list[float] = field(default_factory=list)  # gaps between streamed events
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    out = {"mean": round(1000 * sum(values) / len(values), 3)}
    for q in PERCENTILES:
        out[f"p{q}"] = round(1000 * percentile(values, q), 3)
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The figures of one run (server or baseline); latencies in milliseconds."""
    done = [r for r in results if r.ok]
    first = min((r.start for r in results), default=0.0)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    output_tokens = sum(r.completion_tokens for r in done)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [r for r in done if r.kind == kind]
        if mine:
            by_kind[kind] = {
                "completed": len(mine),
                "ttft_ms": distribution_ms([r.ttft for r in mine if r.ttft is not None]),
                "e2e_ms": distribution_ms([r.e2e for r in mine if r.e2e is not None]),
            }
    return {
        "requests": len(results),
        "completed": len(done),
        "errors": len(results) - len(done),
        "error_messages": errors,
        "duration_s": round(duration, 4),
        "total_prompt_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
        "request_throughput": round(len(done) / duration, 4) if duration > 0 else None,
        "output_throughput": round(output_tokens / duration, 3) if duration > 0 else None,
        "ttft_ms": distribution_ms([r.ttft for r in done if r.ttft is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot) is not None]),
        "e2e_ms": distribution_ms([r.e2e for r in done if r.e2e is not None]),
        "by_kind": by_kind,
        "per_request": [_record(r, first) for r in results],
    }


def _record(r: RequestResult, first: float) -> dict[str, Any]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 3)

    return {
        "index": r.index,
        "kind": r.kind,
        "sent_ms": ms(r.start - first),
        "ttft_ms": ms(r.ttft),
        "e2e_ms": ms(r.e2e),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "events": len(r.itl) + (1 if r.ttft is not None else 0),
        "error": r.error,
    }


# --- the load generator ---
def _form(request: BenchRequest, max_tokens: int):
    """The /chat form: url-encoded for text, multipart when there are files (as curl sends)."""
    import aiohttp

    form = aiohttp.FormData(
        {
            "prompt": request.prompt,
            "stream": "true",
            "max_tokens": str(max_tokens),
            "ignore_eos": "true",
            "temperature": "0",
        }
    )
    for item in request.media:
        mime = MIME.get(Path(item.filename).suffix.lower(), "application/octet-stream")
        form.add_field(item.kind, item.data, filename=item.filename, content_type=mime)
    return form


def _error_message(status: int, body: bytes) -> str:
    import json

    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


async def send_one(session, url: str, request: BenchRequest, max_tokens: int, headers: dict):
    """One streaming POST /chat; every SSE event timed on arrival."""
    import json
    import time

    import aiohttp

    result = RequestResult(request.index, request.kind)
    form = _form(request, max_tokens)
    result.start = time.perf_counter()
    last: float | None = None
    try:
        async with session.post(f"{url}/chat", data=form, headers=headers) as response:
            if response.status != 200:
                result.error = _error_message(response.status, await response.read())
                return result
            async for raw in response.content:  # one line per iteration
                now = time.perf_counter()
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    error = event["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    result.error = f"stream error: {message}"
                    return result
                if last is None:
                    result.ttft = now - result.start
                else:
                    result.itl.append(now - last)
                last = now
                usage = event.get("usage")
                if usage is not None:
                    result.e2e = now - result.start
                    result.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    result.completion_tokens = int(usage.get("completion_tokens", 0))
        if result.e2e is None:
            result.error = "the stream ended without a final event (usage)"
        else:
            result.ok = True
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except ValueError as exc:  # a malformed event
        result.error = f"bad SSE event: {exc}"
    return result


async def run_load(
    requests: list[BenchRequest],
    *,
    url: str,
    max_tokens: int,
    concurrency: int | None,
    request_rate: float | None,
    seed: int,
    api_key: str | None = None,
    timeout: float = 600.0,
    warmup: list[BenchRequest] | None = None,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send the requests; returns their results (in request order) and the run's duration.

    aiohttp, not httpx (as `vllm bench serve`): the load generator shares the machine with the
    server, and on 2 CPUs httpx's per-chunk overhead showed up in the measured TTFT."""
    import asyncio
    import random
    import time

    import aiohttp
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0)  # no connection cap: --concurrency is the cap
    timeouts = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 30.0))
    results: list[RequestResult | None] = [None] * len(requests)
    async with aiohttp.ClientSession(connector=connector, timeout=timeouts) as session:
        for request in warmup or []:
            done = await send_one(session, url, request, max_tokens, headers)
            if not done.ok:
                raise RuntimeError(f"warm-up request failed: {done.error}")
        bar = tqdm(total=len(requests), desc="bench", unit="req", disable=not progress)
        gate = asyncio.Semaphore(concurrency) if concurrency else None

        async def one(position: int) -> None:
            if gate is not None:
                async with gate:
                    results[position] = await send_one(
                        session, url, requests[position], max_tokens, headers
                    )
            else:
                results[position] = await send_one(
                    session, url, requests[position], max_tokens, headers
                )
            bar.update(1)

        start = time.perf_counter()
        if request_rate is None or math.isinf(request_rate):
            await asyncio.gather(*(one(i) for i in range(len(requests))))
        else:
            rng = random.Random(seed)
            tasks = []
            due = start
            for i in range(len(requests)):
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
                due += rng.expovariate(request_rate)
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return [r for r in results if r is not None], duration


# --- the naive baseline: HF generate, one request at a time, in this process ---
def run_baseline(
    requests: list[BenchRequest],
    *,
    model_dir: Path | None,
    max_tokens: int,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    warmup: list[BenchRequest] | None = None,
    progress: bool = True,
) -> tuple[list[RequestResult], float, dict[str, Any]]:
    import time

    import torch
    from tqdm import tqdm

    from xllm.model.checkpoint import default_model_dir, load_model

    model_dir = model_dir or default_model_dir()
    model = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)  # type: ignore[arg-type]
    info = {
        "model": str(model_dir),
        "device": str(model.device),
        "dtype": str(model.llm.get_input_embeddings().weight.dtype).replace("torch.", ""),
        "quantize": quantize,
        "method": "HF generate(inputs_embeds=..., do_sample=False, "
        "min_new_tokens=max_new_tokens), one request at a time, dynamic cache",
    }
    for request in warmup or []:
        _baseline_one(model, request, max_tokens)
    results = []
    bar = tqdm(total=len(requests), desc="baseline", unit="req", disable=not progress)
    start = time.perf_counter()
    for request in requests:
        results.append(_baseline_one(model, request, max_tokens))
        bar.update(1)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    duration = time.perf_counter() - start
    bar.close()
    return results, duration, info


def _baseline_one(model, request: BenchRequest, max_tokens: int) -> RequestResult:
    """Decode and encode the media, embed the prompt as the server does, then HF generate."""
    import itertools
    import time
    import warnings

    import torch
    from transformers.generation.streamers import BaseStreamer

    from xllm.model.media import MediaLimits, decode_audio, decode_image, decode_video
    from xllm.model.prompt import bind_media

    class TimingStreamer(BaseStreamer):
        """Arrival time of every generated token (generate's first put is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    result = RequestResult(request.index, request.kind)
    result.start = time.perf_counter()
    try:
        limits = MediaLimits()
        decoded = []
        for item in request.media:
            if item.kind == "image":
                decoded.append(decode_image(item.data, limits))
            elif item.kind == "audio":
                decoded.append(decode_audio(item.data, limits))
            else:
                ic = model.config.image_interface
                decoded.append(
                    decode_video(item.data, limits, fps=ic.video_fps, max_frames=ic.max_frames)
                )
        kinds = [item.kind for item in request.media]
        prepared = [model.prepare(k, m) for k, m in zip(kinds, decoded, strict=True)]
        with torch.inference_mode():
            encoded = model.encode(prepared)
            turns = [("user", request.prompt)]
            layout = model.layout(bind_media(turns, kinds), encoded)
            embeds = model.embed(layout, encoded)[None]
            streamer = TimingStreamer()
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                output = model.llm.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=model.tokenizer.pad_token_id,
                )
    except Exception as exc:  # reported like a server error, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    times = streamer.times
    result.prompt_tokens = len(layout)
    result.completion_tokens = int(output.shape[1])  # inputs_embeds only: new tokens only
    if times:
        result.ttft = times[0] - result.start
        result.e2e = times[-1] - result.start
        result.itl = [b - a for a, b in itertools.pairwise(times)]
        result.ok = True
    else:
        result.error = "generate produced no token"
    return result


# --- the command ---
def format_report(report: dict[str, Any]) -> str:
    lines = []
    sections = [("server", report["server"])]
    if report.get("baseline"):
        sections.append(("baseline (HF generate, 1 at a time)", report["baseline"]))
    for title, s in sections:
        lines.append(f"== {title} ==")
        lines.append(
            f"completed {s['completed']}/{s['requests']}, errors {s['errors']}, "
            f"{s['duration_s']:.2f} s"
        )
        for message, count in s["error_messages"].items():
            lines.append(f"  error x{count}: {message}")
        if s["completed"]:
            lines.append(
                f"output tokens/s {s['output_throughput']:.2f}   requests/s "
                f"{s['request_throughput']:.3f}   output tokens {s['total_output_tokens']}"
            )
            lines.append(f"{'ms':<6}{'mean':>11}{'p50':>11}{'p95':>11}{'p99':>11}")
            for name in ("ttft", "itl", "tpot", "e2e"):
                d = s[f"{name}_ms"]
                cells = "".join(
                    f"{'-' if d[k] is None else format(d[k], '.2f'):>11}"
                    for k in ("mean", "p50", "p95", "p99")
                )
                lines.append(f"{name:<6}{cells}")
    ratios = report.get("ratios")
    if ratios:
        lines.append("== server / baseline ==")
        for key, value in ratios.items():
            lines.append(f"{key}: {'-' if value is None else format(value, '.2f')}")
    return "\n".join(lines)


def _fast_loop_factory() -> Callable[[], AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def run_bench(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import time

    from xllm.main import UserError

    if args.requests < 1:
        raise UserError("--requests must be at least 1")
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        raise UserError("--concurrency must be at least 1")
    if args.request_rate is not None and not args.request_rate > 0:
        raise UserError("--request-rate must be > 0")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.media_dir is not None and not args.media_dir.is_dir():
        raise UserError(f"--media-dir: '{args.media_dir}' is not a directory")
    try:
        mix = parse_mix(args.mix)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    concurrency = args.concurrency
    if concurrency is None and args.request_rate is None:
        concurrency = 1
    url = args.url.rstrip("/")
    api_key = args.api_key or os.environ.get("XLLM_API_KEY") or None

    requests = build_requests(args.requests, mix, args.seed, args.media_dir)
    warmup = build_requests(args.warmup, mix, args.seed + 1, args.media_dir, offset=-args.warmup)
    try:
        # uvloop when installed (it comes with the server): a load generator should not be
        # what limits the load, nor add its own event-loop lag to the latencies it reports.
        with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
            results, duration = runner.run(
                run_load(
                    requests,
                    url=url,
                    max_tokens=args.max_tokens,
                    concurrency=concurrency,
                    request_rate=args.request_rate,
                    seed=args.seed,
                    api_key=api_key,
                    timeout=args.timeout,
                    warmup=warmup,
                    progress=not args.no_progress,
                )
            )
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label": args.label,
        "config": {
            "url": url,
            "concurrency": concurrency,
            "request_rate": args.request_rate,
            "requests": args.requests,
            "warmup": args.warmup,
            "mix": mix,
            "kinds": kind_counts(mix, args.requests),
            "max_tokens": args.max_tokens,
            "media_dir": str(args.media_dir) if args.media_dir else None,
            "seed": args.seed,
        },
        "server": summarize(results, duration),
        "baseline": None,
        "baseline_config": None,
        "ratios": None,
    }
    if args.baseline:
        chosen = requests[: args.baseline_requests] if args.baseline_requests else requests
        base_results, base_duration, info = run_baseline(
            chosen,
            model_dir=args.model,
            max_tokens=args.max_tokens,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            warmup=warmup,
            progress=not args.no_progress,
        )
        report["baseline"] = summarize(base_results, base_duration)
        report["baseline_config"] = {**info, "requests": len(chosen)}
        server, base = report["server"], report["baseline"]
        report["ratios"] = {
            "output_throughput": _ratio(server["output_throughput"], base["output_throughput"]),
            "request_throughput": _ratio(server["request_throughput"], base["request_throughput"]),
            "ttft_p50": _ratio(server["ttft_ms"]["p50"], base["ttft_ms"]["p50"]),
        }
    print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0
