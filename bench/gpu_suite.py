#!/usr/bin/env python3
"""The GPU suite: xllm's serving path against naive HF `generate`, at real model shapes.

    OUT=/tmp/out bench/gpu_suite.sh            # GLM-4-9B + ViT-g + Whisper-large-v3 shapes, bf16
    OUT=/tmp/out bench/gpu_suite.sh --tiny     # the same code at toy sizes, on the CPU (tests)

It builds, in this process and with random weights (nothing is downloaded, no model directory is
written), a GLM-4-9B-shaped `GlmForCausalLM`, BLIP-2's ViT-g + Q-Former and a Whisper-large-v3-
shaped encoder, directly on the GPU in bf16 (encoders in the LLM's dtype, X2L interfaces in float32:
the layout `load_model` gives on CUDA), wraps them in the real `XLLM`, and measures:

    encoders           one image / 32 images (ViT + Q-Former + projection), 30 s of audio (Whisper)
    engine_decode      ms per decode step at batch 1, 16, 64 through the engine's path
                       (SlotDecoder over the slot prefix -> finite check -> sample_next)
    compiled_decode    the same with the decode step compiled (torch.compile, CUDA graphs per
                       batch / kv-length bucket: `--compile on`, the default on CUDA)
    hf_decode          the same batches through naive HF `generate` (dynamic cache, greedy)
    *_throughput       aggregate output tokens/s with 64 concurrent streams through the real Engine
    *_ttft_image       TTFT p50 of a one-image request while 16 streams decode (same Engine)
                       (compiled_* first, engine_* after the HF baseline)
    nf4                engine, compiled and HF decode at batch 1, then the compiled Engine's
                       throughput and TTFT, with the LLM's decoder in bitsandbytes nf4 (double
                       quantization, lm_head kept, as `--quantize nf4` loads it)

with the peak GPU memory of each. Results go to $OUT/gpu_suite.json (written after every section,
so a run cut short still leaves what it measured) and a markdown table to $OUT/gpu_suite.md.
Sections run in that order and are skipped once `--budget` seconds have passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def ensure_importable() -> None:
    """Make `xllm` importable from this checkout when it is not installed (a bare GPU machine):
    the checkout's root holds the package (xllm/)."""
    try:
        import xllm.server.engine.worker  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))


@dataclass
class Sizes:
    """What each section runs; FULL on a GPU, TINY on the CPU in tests."""

    ctx: int  # KV positions per slot
    prompt: int  # prompt positions before the timed decode steps
    batches: tuple[int, ...]
    warmup_steps: int
    steps: int  # timed decode steps per batch size
    throughput_streams: int
    throughput_tokens: int
    ttft_streams: int
    ttft_requests: int


FULL = Sizes(
    ctx=1024,
    prompt=128,
    batches=(1, 16, 64),
    warmup_steps=4,
    steps=24,
    throughput_streams=64,
    throughput_tokens=96,
    ttft_streams=16,
    ttft_requests=8,
)
TINY = Sizes(
    ctx=256,
    prompt=32,
    batches=(1, 16, 64),
    warmup_steps=2,
    steps=6,
    throughput_streams=64,
    throughput_tokens=8,
    ttft_streams=16,
    ttft_requests=3,
)


# --- building the model (random weights, real shapes, straight onto the device) ---
def build_model(tiny: bool, device, dtype, ctx: int):
    import torch
    from transformers import (
        Blip2VisionConfig,
        Blip2VisionModel,
        GlmConfig,
        GlmForCausalLM,
        WhisperConfig,
        WhisperFeatureExtractor,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from xllm.model.config import (
        ComponentPath,
        QFormerInterfaceConfig,
        SpeechInterfaceConfig,
        XLLMConfig,
    )
    from xllm.model.encoders.speech import SpeechEncoder, tiny_whisper_config
    from xllm.model.encoders.vision import VisionEncoder, tiny_vision_config
    from xllm.model.tiny import (
        tiny_glm,
        tiny_image_interface,
        tiny_speech_interface,
        train_tokenizer,
        with_stop_ids,
    )
    from xllm.model.xllm import XLLM

    # The tiny BPE tokenizer (GLM-4's special tokens and chat template): its ids lie inside any
    # vocabulary, and ids it does not know decode to nothing, which is all the engine needs.
    tokenizer = train_tokenizer()
    if tiny:
        glm_config = tiny_glm(tokenizer, max_len=ctx).config
        vision_config = tiny_vision_config()
        whisper_config = tiny_whisper_config()
        image_interface = tiny_image_interface()
        speech_interface = tiny_speech_interface()
    else:  # glm-4-9b-chat-hf, BLIP-2 (ViT-g/14 + BERT-base Q-Former), whisper-large-v3's encoder
        glm_config = GlmConfig(
            vocab_size=151552,
            hidden_size=4096,
            intermediate_size=13696,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=2,
            head_dim=128,
            partial_rotary_factor=0.5,
            attention_bias=True,
            max_position_embeddings=131072,
            pad_token_id=151329,
            eos_token_id=[151329, 151336, 151338],
            tie_word_embeddings=False,
        )
        vision_config = Blip2VisionConfig()
        whisper_config = WhisperConfig(
            d_model=1280,
            encoder_layers=32,
            encoder_attention_heads=20,
            encoder_ffn_dim=5120,
            decoder_layers=2,
            decoder_attention_heads=20,
            decoder_ffn_dim=5120,
            num_mel_bins=128,
            max_source_positions=1500,
            vocab_size=51866,
        )
        image_interface = QFormerInterfaceConfig()  # 32 queries, Blip2QFormerConfig defaults
        speech_interface = SpeechInterfaceConfig()  # C-Former, 512 wide
    encoder_dtype = dtype if device.type == "cuda" else torch.float32
    with torch.device(device):
        llm = GlmForCausalLM._from_config(glm_config, dtype=dtype)
        vision_model = Blip2VisionModel._from_config(vision_config, dtype=encoder_dtype)
        whisper = WhisperEncoder._from_config(whisper_config, dtype=encoder_dtype)
    with_stop_ids(llm.eval().requires_grad_(False))
    size = vision_config.image_size
    vision = VisionEncoder(
        vision_model.eval().requires_grad_(False),
        BlipImageProcessorPil(size={"height": size, "width": size}),
    )
    window_seconds = whisper_config.max_source_positions // 50
    speech = SpeechEncoder(
        whisper.eval().requires_grad_(False),
        WhisperFeatureExtractor(
            feature_size=whisper_config.num_mel_bins, chunk_length=window_seconds
        ),
    )
    config = XLLMConfig(
        llm=ComponentPath("llm"),
        vision=ComponentPath("vision"),
        speech=ComponentPath("speech"),
        image_interface=image_interface,
        speech_interface=speech_interface,
        name="xllm-bench-tiny" if tiny else "xllm-bench-glm4-9b-shape",
    )
    with torch.device(device):  # interfaces in float32 on the device, as load_model leaves them
        model = XLLM(config, llm, tokenizer, vision, speech)
    for module in model.interfaces().values():
        module.eval().requires_grad_(False)
    return model


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- measurements ---
class Clock:
    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def engine_decode(model, decoder, batch: int, sizes: Sizes, clock: Clock) -> dict[str, Any]:
    """Decode steps as the worker runs them: the SlotDecoder's step over slots [0, batch) (plain
    or compiled), finite check, sample_next. The first step (compile, CUDA-graph recording) is
    reported apart and the warm-up steps are not timed."""
    import torch

    from xllm.model.detokenize import eos_token_ids
    from xllm.model.generate import forward_rows
    from xllm.model.sampling import SamplingParams, sample_next

    llm, device = model.llm, model.device
    eos = sorted(eos_token_ids(llm, model.tokenizer))
    slots = list(range(batch))
    with torch.inference_mode():
        prompt = torch.randint(20, 500, (batch, sizes.prompt), device=device)
        positions = torch.arange(sizes.prompt, device=device).expand(batch, -1)
        embeds = llm.get_input_embeddings()(prompt)
        logits = forward_rows(llm, decoder.cache, embeds, 0, positions, sizes.prompt)
        clock.sync()
    params = [SamplingParams(max_tokens=10**6, ignore_eos=True) for _ in range(batch)]
    histories: list[list[int]] = [[] for _ in range(batch)]
    generators = [None] * batch
    lengths = [sizes.prompt] * batch
    tokens = logits.argmax(-1).tolist()
    times = []
    for _ in range(1 + sizes.warmup_steps + sizes.steps):
        start = time.perf_counter()
        logits = decoder(slots, tokens, lengths)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        tokens = sample_next(logits, params, histories, generators, eos)
        times.append(time.perf_counter() - start)
        for row, token in enumerate(tokens):
            histories[row].append(token)
        lengths = [n + 1 for n in lengths]
    first_step_s, times = times[0], times[1:]
    timed = times[sizes.warmup_steps :]
    ms = 1000 * statistics.median(timed)
    return {
        "batch": batch,
        "ms_per_step": round(ms, 3),
        "ms_per_step_mean": round(1000 * statistics.fmean(timed), 3),
        "tokens_per_s": round(batch * 1000 / ms, 1),
        "steps": len(timed),
        "all_finite": all(finite),
        "first_step_s": round(first_step_s, 3),
        "compiled": decoder.compiled,
        "shape": decoder.shape_for(slots, lengths),
    }


def hf_decode(model, batch: int, sizes: Sizes, clock: Clock) -> dict[str, Any]:
    """Naive HF generate (dynamic cache, greedy); step time from the streamer's token times."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Times(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    llm, device = model.llm, model.device
    n = sizes.warmup_steps + sizes.steps + 1
    ids = torch.randint(20, 500, (batch, sizes.prompt), device=device)
    streamer = Times()
    with torch.inference_mode():
        llm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            streamer=streamer,
            pad_token_id=llm.generation_config.pad_token_id,
        )
    gaps = [b - a for a, b in zip(streamer.times[:-1], streamer.times[1:], strict=True)]
    timed = gaps[sizes.warmup_steps :]
    ms = 1000 * statistics.median(timed)
    return {
        "batch": batch,
        "ms_per_step": round(ms, 3),
        "ms_per_step_mean": round(1000 * statistics.fmean(timed), 3),
        "tokens_per_s": round(batch * 1000 / ms, 1),
        "steps": len(timed),
    }


class StepRecorder:
    """Keeps (time, running) at every worker iteration: the `step` hook of an EngineObserver
    (`step_recorder()` adds the others, which do nothing; this script imports xllm late, see
    ensure_importable)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []

    def step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.steps.append((time.perf_counter(), running))

    def step_ms(self, running: int) -> float | None:
        """Median time between iterations that both ran with exactly `running` sequences."""
        gaps = [
            b[0] - a[0]
            for a, b in zip(self.steps[:-1], self.steps[1:], strict=True)
            if a[1] == running and b[1] == running
        ]
        return round(1000 * statistics.median(gaps), 3) if gaps else None


PROMPTS = (
    "Describe a red circle on a green square in detail.",
    "Tell me a story about a yellow star that moves left.",
    "What is the quick brown fox known for?",
    "Explain how large language models read images and speech.",
)


def make_engine(
    model, max_batch: int, ctx: int, observer, compile: bool = False, backend: str = "inductor"
):
    from xllm.server.engine.config import EngineConfig
    from xllm.server.engine.worker import Engine

    config = EngineConfig(
        max_batch=max_batch,
        max_queue=256,
        max_model_len=ctx,
        prefill_chunk=512,
        compile=compile,
        compile_backend=backend,
    )
    return Engine(model, config, observer)


def text_request(i: int, max_tokens: int, arrival: float | None = None):
    from xllm.model.prompt import bind_media
    from xllm.model.sampling import SamplingParams
    from xllm.server.engine.events import EngineRequest

    messages = bind_media([("user", f"{PROMPTS[i % len(PROMPTS)]} ({i})")], [])
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    request = EngineRequest(f"text-{i}", messages, [], params, True)
    if arrival is not None:
        request.arrival = arrival
    return request


async def consume(handle, record: dict) -> None:
    """Drain one request's events into record: first-token time, tokens, finish or error."""
    from xllm.server.engine.events import ErrorEvent, FinishEvent

    while True:
        event = await handle.next_event()
        if "first" not in record:
            record["first"] = time.perf_counter()
        if isinstance(event, ErrorEvent):
            record["error"] = event.message
            return
        if isinstance(event, FinishEvent):
            record["tokens"] = event.usage.completion_tokens
            record["end"] = time.perf_counter()
            return


def run_with_engine(engine, main: Callable[[], Any]) -> Any:
    """asyncio.run(main()), stopping the engine while the loop is still open (it posts to it)."""

    async def wrapper() -> Any:
        try:
            return await main()
        finally:
            await asyncio.to_thread(engine.shutdown)

    try:
        return asyncio.run(wrapper())
    finally:
        engine.shutdown()


def submit(engine, request, loop):
    from xllm.server.engine.events import RequestHandle

    engine.reserve()
    handle = RequestHandle(request.request_id, loop)
    engine.submit(request, handle)
    return handle


async def settle(engine) -> None:
    """Wait until the engine holds no request (cancelled ones included) before the loop closes."""
    if not await asyncio.to_thread(engine.join, 60):
        raise RuntimeError("the engine still holds requests after 60 s")


def step_recorder() -> StepRecorder:
    from xllm.server.engine.contract import EngineObserver

    class Recorder(StepRecorder, EngineObserver):
        pass

    return Recorder()


def engine_throughput(engine, recorder: StepRecorder, sizes: Sizes) -> dict[str, Any]:
    """N streams submitted at once to a started Engine; tokens/s from submit to last token."""
    n, max_tokens = sizes.throughput_streams, sizes.throughput_tokens
    recorder.steps.clear()

    async def run() -> tuple[list[dict], float, float]:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        records: list[dict] = [{} for _ in range(n)]
        handles = [submit(engine, text_request(i, max_tokens), loop) for i in range(n)]
        await asyncio.gather(*(consume(h, r) for h, r in zip(handles, records, strict=True)))
        end = time.perf_counter()
        await settle(engine)
        return records, start, end

    records, start, end = asyncio.run(run())
    errors = [r["error"] for r in records if "error" in r]
    tokens = sum(r.get("tokens", 0) for r in records)
    ttfts = [r["first"] - start for r in records if "first" in r]
    steady = recorder.step_ms(n)
    return {
        "streams": n,
        "max_tokens": max_tokens,
        "output_tokens": tokens,
        "wall_s": round(end - start, 3),
        "output_tokens_per_s": round(tokens / (end - start), 1),
        "steady_ms_per_step": steady,
        "steady_tokens_per_s": round(n * 1000 / steady, 1) if steady else None,
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "ttft_max_ms": round(1000 * max(ttfts), 1) if ttfts else None,
        "errors": errors[:3],
        "error_count": len(errors),
    }


def synthetic_image(seed: int, size: int = 224):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    pixels[y : y + size // 3, x : x + size // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def engine_ttft_image(engine, recorder: StepRecorder, model, sizes: Sizes) -> dict[str, Any]:
    """One-image requests, one after another, each arriving while N text streams decode."""
    from xllm.model.prompt import bind_media
    from xllm.model.sampling import SamplingParams
    from xllm.server.engine.events import EngineRequest

    n = sizes.ttft_streams
    recorder.steps.clear()

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        background = [{} for _ in range(n)]
        handles = [
            submit(engine, text_request(i, sizes.ctx - 64), loop) for i in range(n)
        ]  # long enough to outlast the measurement; cancelled at the end
        tasks = [
            asyncio.create_task(consume(h, r)) for h, r in zip(handles, background, strict=True)
        ]
        while not all("first" in r for r in background):  # every stream is decoding
            await asyncio.sleep(0.005)
        ttfts, prepare, running = [], [], []
        for k in range(sizes.ttft_requests):
            image = synthetic_image(1000 + k)  # distinct images: no encoder-cache hits
            arrival = time.monotonic()
            start = time.perf_counter()
            prepared = model.prepare("image", image)  # the server's media pool does this
            prepare.append(time.perf_counter() - start)
            messages = bind_media([("user", "What is in the image?")], ["image"])
            request = EngineRequest(
                f"image-{k}",
                messages,
                [prepared],
                SamplingParams(max_tokens=4, ignore_eos=True),
                True,
                arrival,
            )
            record: dict = {}
            handle = submit(engine, request, loop)
            running.append(engine.num_running)
            await consume(handle, record)
            if "error" in record:
                raise RuntimeError(f"image request failed: {record['error']}")
            ttfts.append(record["first"] - start)
        decoding_now = sum(1 for r in background if "end" not in r and "error" not in r)
        for handle, task in zip(handles, tasks, strict=True):
            handle.cancel()  # the engine frees the slot and sends nothing more
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await settle(engine)
        errors = [r["error"] for r in background if "error" in r]
        step = recorder.step_ms(n)
        return {
            "streams": n,
            "image_requests": len(ttfts),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_max_ms": round(1000 * max(ttfts), 1),
            "prepare_p50_ms": round(1000 * statistics.median(prepare), 2),
            "running_at_submit": running,
            "streams_still_decoding_at_end": decoding_now,
            "background_ms_per_step": step,
            "background_errors": errors[:3],
        }

    return asyncio.run(run())


def encoders(model, tiny: bool, clock: Clock) -> dict[str, Any]:
    """Vision (ViT + Q-Former + projection) for 1 and 32 images; Whisper for one 30 s window."""
    import numpy as np
    import torch

    out: dict[str, Any] = {}

    def timed(fn: Callable[[], Any], repeats: int = 3) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = clock.now()
            fn()
            times.append(clock.now() - start)
        return round(1000 * statistics.median(times), 2)

    with torch.inference_mode():
        for count in (1, 32):
            items = [model.prepare("image", synthetic_image(i)) for i in range(count)]
            out[f"image_x{count}_ms"] = timed(lambda items=items: model.encode(items))
        seconds = model.speech.features.window_samples // 16000
        features, _ = model.speech.features(np.zeros(seconds * 16000, np.float32))
        features = features.to(model.device)
        out[f"whisper_{seconds}s_ms"] = timed(lambda: model.speech(features))
        audio = model.prepare("audio", np.zeros(seconds * 16000, np.float32))
        try:  # the whole speech path: Whisper (LLM dtype) -> C-Former (float32) -> projection
            out[f"audio_{seconds}s_full_path_ms"] = timed(lambda: model.encode([audio]))
        except Exception as exc:
            out[f"audio_{seconds}s_full_path_error"] = f"{type(exc).__name__}: {exc}"
    return out


def quantize_nf4(llm, compute_dtype) -> int:
    """Replace the decoder's nn.Linear layers with bitsandbytes nf4 (lm_head kept, as HF does)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    replaced = 0
    for parent in list(llm.model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            device = child.weight.device
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            quantized = quantized.to(device)
            setattr(parent, name, quantized)
            del child
            replaced += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replaced


# --- the run ---
class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.sizes = TINY if args.tiny else FULL
        if args.steps:
            self.sizes = replace(self.sizes, steps=args.steps)
        want = args.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_suite: --device cuda, but torch sees no CUDA device")
        if want == "cpu" and not args.tiny:
            raise SystemExit("gpu_suite: the full sizes need a GPU (9.4 B parameters); use --tiny")
        self.device = torch.device(want)
        if args.compile_backend is None:
            args.compile_backend = "inductor" if self.device.type == "cuda" else "eager"
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.clock = Clock(self.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.report: dict[str, Any] = {
            "suite": "xllm gpu suite",
            "tiny": args.tiny,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **environment(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "sizes": asdict(self.sizes),
            "budget_s": args.budget,
            "model": {},
            "results": {},
            "errors": {},
            "skipped": [],
        }

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def memory_reset(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def memory_peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 3)

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.elapsed > self.args.budget:
            self.report["skipped"].append(name)
            print(f"[{self.elapsed:6.1f}s] {name}: skipped (budget)", flush=True)
            self.write()
            return None
        print(f"[{self.elapsed:6.1f}s] {name} ...", flush=True)
        self.memory_reset()
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            self.report["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            result = None
        else:
            entry = result if isinstance(result, dict) else {"value": result}
            entry = {**entry, "seconds": round(time.perf_counter() - start, 2)}
            entry["peak_gpu_gb"] = self.memory_peak_gb()
            self.report["results"][name] = entry
            print(f"[{self.elapsed:6.1f}s] {name}: {json.dumps(entry)}", flush=True)
        self.write()
        return result

    def write(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed, 2)
        (self.out / "gpu_suite.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "gpu_suite.md").write_text(markdown(self.report))

    def run(self) -> int:
        from xllm.model.generate import SlotDecoder
        from xllm.model.kv_cache import SlotKVCache

        sizes = self.sizes
        model = self.section("build", self.build)
        if model is None:
            return 1
        model = self._model
        self.section("encoders", lambda: encoders(model, self.args.tiny, self.clock))
        cache = SlotKVCache.for_model(model.llm, max(sizes.batches), sizes.ctx, model.device)
        self.report["model"]["kv_cache_gb"] = round(cache.bytes / 2**30, 3)
        self.decode_sections("engine", SlotDecoder(model.llm, cache), sizes.batches)
        # The compiled path before the naive baseline: its compiles take the budget's bulk.
        compiled = SlotDecoder(model.llm, cache, self.compile_options())
        self.decode_sections("compiled", compiled, sizes.batches[:1])
        self.serving_sections("compiled", compile=True)
        self.decode_sections("compiled", compiled, sizes.batches[1:])
        del cache, compiled
        for batch in sizes.batches:
            self.section(
                f"hf_decode_b{batch}",
                lambda batch=batch: hf_decode(model, batch, sizes, self.clock),
            )
        self.serving_sections("engine", compile=False)
        self.section("nf4_quantize", lambda: self.quantize(model))
        if "nf4_quantize" in self.report["results"]:
            cache = SlotKVCache.for_model(model.llm, 1, sizes.ctx, model.device)
            self.decode_sections("nf4_engine", SlotDecoder(model.llm, cache), (1,))
            compiled = SlotDecoder(model.llm, cache, self.compile_options())
            self.decode_sections("nf4_compiled", compiled, (1,))
            self.section("nf4_hf_decode_b1", lambda: hf_decode(model, 1, sizes, self.clock))
            del cache, compiled
            self.serving_sections("nf4_compiled", compile=True)
        self.report["finished"] = True
        self.write()
        print(markdown(self.report), flush=True)
        return 1 if self.report["errors"] else 0

    def compile_options(self):
        from xllm.model.generate import CompileOptions

        return replace(CompileOptions.for_device(self.device), backend=self.args.compile_backend)

    def decode_sections(self, prefix: str, decoder, batches: tuple[int, ...]) -> None:
        for batch in batches:
            self.section(
                f"{prefix}_decode_b{batch}",
                lambda batch=batch: engine_decode(
                    self._model, decoder, batch, self.sizes, self.clock
                ),
            )

    def serving_sections(self, prefix: str, compile: bool) -> None:
        """Aggregate throughput of N streams, then image TTFT under load, through one Engine
        (one set of compiled graphs for both)."""
        model, sizes = self._model, self.sizes
        recorder = step_recorder()
        slots = max(sizes.throughput_streams, sizes.ttft_streams + 2)
        engine = make_engine(model, slots, sizes.ctx, recorder, compile, self.args.compile_backend)
        engine.start()
        try:
            self.section(f"{prefix}_throughput", lambda: engine_throughput(engine, recorder, sizes))
            self.section(
                f"{prefix}_ttft_image",
                lambda: engine_ttft_image(engine, recorder, model, sizes),
            )
        finally:
            engine.shutdown()

    def build(self) -> dict[str, Any]:
        import torch

        torch.manual_seed(0)
        model = build_model(self.args.tiny, self.device, self.dtype, self.sizes.ctx)
        self._model = model
        llm = model.llm
        info = {
            "llm_params": count_params(llm),
            "vision_params": count_params(model.vision),
            "speech_params": count_params(model.speech),
            "interface_params": sum(count_params(m) for m in model.interfaces().values()),
            "llm_config": {
                k: getattr(llm.config, k, None)
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "intermediate_size",
                    "vocab_size",
                    "attention_bias",
                    "rope_parameters",
                )
            },
        }
        if self.device.type == "cuda":
            info["allocated_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        self.report["model"].update(info)
        return info

    def quantize(self, model) -> dict[str, Any]:
        import torch

        replaced = quantize_nf4(model.llm, self.dtype)
        info: dict[str, Any] = {"linear_layers_nf4": replaced}
        if self.device.type == "cuda":
            info["allocated_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        return info


def environment(device) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        )
        or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        env["bitsandbytes"] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
        env["commit"] = commit or None
        env["dirty"] = bool(dirty)
    except OSError:
        env["commit"], env["dirty"] = None, None
    return env


def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    lines = [
        f"xllm gpu suite ({'tiny, ' if report['tiny'] else ''}{report['device']}, "
        f"{report['dtype']}, {report['date']}, commit {str(report.get('commit'))[:10]}"
        f"{' +dirty' if report.get('dirty') else ''})",
        "",
        "| measurement | engine path | compiled engine path | naive HF generate "
        "| peak GPU GB (engine / compiled / HF) |",
        "| --- | --- | --- | --- | --- |",
    ]

    def cell(entry: dict | None, key: str, unit: str) -> str:
        return "-" if not entry or entry.get(key) is None else f"{entry[key]} {unit}"

    def peak(entry: dict | None) -> str:
        return "-" if not entry or entry.get("peak_gpu_gb") is None else str(entry["peak_gpu_gb"])

    def row(label: str, names: tuple[str, str, str], key: str, unit: str, extra: str = "") -> None:
        entries = [r.get(name) for name in names]
        cells = [
            cell(e, key, unit) + (f" ({cell(e, extra, 'tok/s')})" if extra else "") for e in entries
        ]
        lines.append(f"| {label} | {' | '.join(cells)} | {' / '.join(map(peak, entries))} |")

    for batch in report["sizes"]["batches"]:
        names = (f"engine_decode_b{batch}", f"compiled_decode_b{batch}", f"hf_decode_b{batch}")
        row(f"decode, batch {batch}", names, "ms_per_step", "ms/step", "tokens_per_s")
    names = ("nf4_engine_decode_b1", "nf4_compiled_decode_b1", "nf4_hf_decode_b1")
    row("nf4 decode, batch 1", names, "ms_per_step", "ms/step")
    streams, ttft_streams = report["sizes"]["throughput_streams"], report["sizes"]["ttft_streams"]
    for prefix, label in (("", ""), ("nf4_", "nf4 ")):
        names = (f"{prefix}engine_throughput", f"{prefix}compiled_throughput", "-")
        row(
            f"{label}{streams} streams, aggregate (steady)",
            names,
            "output_tokens_per_s",
            "tok/s",
            "steady_tokens_per_s",
        )
        names = (f"{prefix}engine_ttft_image", f"{prefix}compiled_ttft_image", "-")
        row(
            f"{label}TTFT p50, one image, {ttft_streams} streams running",
            names,
            "ttft_p50_ms",
            "ms",
        )
    enc = r.get("encoders") or {}
    if enc:
        shown = ", ".join(f"{k} {v}" for k, v in enc.items() if k not in ("seconds",))
        lines += ["", f"encoders: {shown}"]
    if report["errors"]:
        lines += ["", "errors: " + "; ".join(f"{k}: {v}" for k, v in report["errors"].items())]
    if report["skipped"]:
        lines += ["", "skipped (budget): " + ", ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (runs on the CPU)")
    parser.add_argument(
        "--out", default=os.environ.get("OUT", "./bench-out"), help="folder (default $OUT)"
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--budget", type=float, default=420, help="seconds; later sections are skipped"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per batch")
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend of the compiled sections (default: inductor on CUDA; "
        "eager on the CPU, where the tiny run checks the code paths, not the speed)",
    )
    args = parser.parse_args(argv)
    ensure_importable()
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
