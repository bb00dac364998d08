"""The `xllm bench` command: arguments, the runs, the report on stdout and in `--json`.

Only argparse is imported until the command runs (`xllm --help` stays instant); the baseline
(`--baseline`, which loads the model in this process) lives in `xllm.model.evaluation`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xllm.clients.bench.load import run_load
from xllm.clients.bench.report import format_report, summarize
from xllm.clients.bench.stages import stage_summary
from xllm.clients.bench.workload import DEFAULT_MIX, build_requests, kind_counts, parse_mix
from xllm.model.config import QUANTIZE_CHOICES

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop
    from collections.abc import Callable

DEFAULT_URL = "http://127.0.0.1:8000"


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
    bench.add_argument(
        "--api",
        choices=("xllm", "openai"),
        default="xllm",
        help="xllm (default): POST /chat, or /v1/chat/completions with OpenAI options; openai: "
        "any OpenAI-API server (llama.cpp, vLLM, xllm): streamed /v1/chat/completions naming "
        "--served-model-name, tokens counted from the chunks when it sends no usage",
    )
    bench.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="--api openai: the request's model (default: the first of GET /v1/models)",
    )
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
    openai = bench.add_argument_group(
        "OpenAI options (any of them: requests go to /v1/chat/completions instead of /chat)"
    )
    openai.add_argument("--n", type=int, default=None, metavar="N", help="choices per request")
    openai.add_argument(
        "--response-format",
        default=None,
        metavar="json_object|FILE",
        help="structured output: any JSON object, or JSON valid under the JSON schema in FILE",
    )
    openai.add_argument(
        "--temperature", type=float, default=None, metavar="T", help="(default 0: greedy)"
    )
    openai.add_argument(
        "--extra-body",
        default=None,
        metavar="JSON",
        help='a JSON object merged into every request, e.g. \'{"logit_bias": {"2": -100}}\'',
    )
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


def _fast_loop_factory() -> Callable[[], AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _openai_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The chat-completion fields the flags ask for; None when none is given (POST /chat)."""
    import json

    from xllm.main import UserError

    options: dict[str, Any] = {}
    if args.n is not None:
        if args.n < 1:
            raise UserError("--n must be at least 1")
        options["n"] = args.n
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.response_format == "json_object":
        options["response_format"] = {"type": "json_object"}
    elif args.response_format is not None:
        try:
            schema = json.loads(Path(args.response_format).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--response-format: cannot read a JSON schema: {exc}") from None
        options["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "bench", "schema": schema},
        }
    if args.extra_body is not None:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as exc:
            raise UserError(f"--extra-body: not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise UserError("--extra-body must be a JSON object")
        options.update(extra)
    return options or None


def _first_model(url: str, api_key: str | None) -> str:
    """The first model an OpenAI-API server lists (GET /v1/models)."""
    import httpx

    from xllm.main import UserError

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        listed = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
        return str(listed[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        raise UserError(
            f"--api openai: {url}/v1/models lists no model; name one with --served-model-name"
        ) from None


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
    openai = _openai_options(args)
    if args.api == "openai":
        name = args.served_model_name or _first_model(url, api_key)
        openai = {**(openai or {}), "model": name}

    requests = build_requests(args.requests, mix, args.seed, args.media_dir)
    warmup = build_requests(args.warmup, mix, args.seed + 1, args.media_dir, offset=-args.warmup)
    metrics: list[str | None] = []  # the server's /metrics before and after the measured run
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
                    openai=openai,
                    api=args.api,
                    metrics=metrics,
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
            "openai": openai,
            "api": args.api,
        },
        "server": summarize(results, duration),
        "baseline": None,
        "baseline_config": None,
        "ratios": None,
    }
    before, after = metrics if len(metrics) == 2 else (None, None)
    if before is not None and after is not None:
        report["server"]["stages"] = stage_summary(before, after)
    if args.baseline:
        chosen = requests[: args.baseline_requests] if args.baseline_requests else requests
        from xllm.model.evaluation.bench_baseline import run_baseline

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
