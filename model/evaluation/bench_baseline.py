"""`xllm bench --baseline`: the same requests, one at a time, through HF `generate` in this process.

Media decoded and encoded, the prompt embedded exactly as the server does
(`MediaPreparer.prepare_bytes`, `XLLM.prompt_embeddings`), then `llm.generate(inputs_embeds=...)`.
It lives here, not in `xllm.clients`, because it loads the model: a client does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xllm.clients.bench.report import RequestResult
from xllm.clients.bench.workload import BenchRequest


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
        prepared = [model.preparer.prepare_bytes(item.kind, item.data) for item in request.media]
        with torch.inference_mode():
            prompt = model.prompt_embeddings([("user", request.prompt)], prepared)
            embeds = prompt.embeds[None]  # (1, T, H): generate's batch of one
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
    result.prompt_tokens = len(prompt)
    result.completion_tokens = int(output.shape[1])  # inputs_embeds only: new tokens only
    if times:
        result.ttft = times[0] - result.start
        result.e2e = times[-1] - result.start
        result.itl = [b - a for a, b in itertools.pairwise(times)]
        result.ok = True
    else:
        result.error = "generate produced no token"
    return result
