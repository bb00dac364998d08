#!/usr/bin/env python3
"""Where a batch-1 decode step's time goes on the CPU: the engine loop in process, one request.

    python bench/decode_step_profile.py --model DIR --threads 2 --dtype bfloat16
    python bench/decode_step_profile.py --model DIR --threads 2 --llm-backend llamacpp
    py-spy record -r 500 -f raw -o prof.txt -- python bench/decode_step_profile.py --model DIR
    python bench/pyspy_summary.py prof.txt --top 40

Runs one greedy request (ignore_eos) through `EngineLoop`'s own iteration (`_decode`: the decode
forward, grammar masks, sampling, detokenising, the event) without threads or HTTP, and prints
per-step wall time (p50) for the whole iteration and for the forward alone.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch


class Sink:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.events: list = []

    def push(self, event) -> None:
        self.events.append(event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--llm-backend", choices=["torch", "llamacpp"], default="torch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from xllm.model.checkpoint import load_model
    from xllm.model.prompt import bind_media
    from xllm.model.sampling import SamplingParams
    from xllm.server.engine.config import EngineConfig
    from xllm.server.engine.events import EngineRequest
    from xllm.server.engine.worker import EngineLoop

    model = load_model(args.model, device="cpu", dtype=args.dtype)
    config = EngineConfig(
        max_batch=1, max_model_len=1024, prefix_cache=False, llm_backend=args.llm_backend
    )
    loop = EngineLoop(model, config)
    messages = bind_media([("user", "Write a long story about a red circle.")], [])
    params = SamplingParams(max_tokens=args.steps + 10, ignore_eos=True)
    loop.submit(EngineRequest("r", messages, [], params, True), Sink())
    loop._take_in()
    loop._admit()
    while not loop._prefill():
        pass
    runner, forward_times, step_times = loop.runner, [], []
    inner = runner.slots.decode

    def timed_forward(*a, **k):
        start = time.perf_counter()
        out = inner(*a, **k)
        forward_times.append(time.perf_counter() - start)
        return out

    runner.slots.decode = timed_forward  # type: ignore[method-assign]
    for _ in range(args.steps):
        start = time.perf_counter()
        loop._decode()
        step_times.append(time.perf_counter() - start)
    step = statistics.median(step_times) * 1000
    forward = statistics.median(forward_times) * 1000
    print(
        f"{args.dtype}, {args.threads} threads, {args.steps} steps: iteration p50 {step:.2f} ms, "
        f"decode forward p50 {forward:.2f} ms, the rest {step - forward:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
