#!/usr/bin/env python3
"""The CPU targets, side by side in one run: 1 client against 16 concurrent clients, for every
request mix (text, image, audio, video; each media request with media of its own).

    python bench/cpu_targets.py                      # tiny random model made on the spot
    python bench/cpu_targets.py --model DIR --rounds 3 --server-env OMP_NUM_THREADS=1
    python bench/cpu_targets.py --mix text=1 --mix image=1,text=1   # only these mixes

Starts `xllm serve` (or uses --url), then per mix runs `xllm bench` at concurrency 1 and 16,
alternating, `--rounds` times (so both see the same machine load), and reports per mix and
concurrency the median over rounds of output tokens/s and TTFT p50, their ratios and the
targets, and the server's stage times (p50 per stage, from its /metrics) of the last round:

    aggregate tokens/s at 16 clients >= 8x that at 1 client
    TTFT p50 at 16 clients <= 3x that at 1 client

Writes $OUT/cpu_targets.json (default ./bench-out) and every `xllm bench` report beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TARGET_THROUGHPUT = 8.0
TARGET_TTFT = 3.0
MIXES = ("text=1", "image=1", "audio=1", "video=1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xllm(*args: str) -> list[str]:
    return [sys.executable, "-m", "xllm", *args]


def start_server(model: Path, env: dict[str, str], flags: list[str], log: Path):
    port = free_port()
    command = xllm("serve", "--model", str(model), "--port", str(port), *flags)
    handle = log.open("w")
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url, command
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit(f"the server did not get ready; see {log}")


def cpu_pressure() -> str | None:
    """Linux PSI: the share of time some runnable task waited for a CPU (other jobs' load)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def process_cpu_seconds(process) -> float | None:
    """User + system CPU seconds so far of a server process and its live descendants (the
    engine process, the fork server); Linux /proc, None elsewhere."""
    if process is None:
        return None
    stats: dict[int, list[str]] = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(path.parent.name)] = path.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):  # ended while we looked
            continue
    tree, grew = {process.pid}, True
    while grew:
        found = {pid for pid, fields in stats.items() if int(fields[1]) in tree} - tree
        tree |= found
        grew = bool(found)
    if process.pid not in stats:
        return None
    ticks = sum(int(stats[pid][11]) + int(stats[pid][12]) for pid in tree if pid in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def engine_only(model_dir: Path, requests: dict[int, int], max_tokens: int, rounds: int) -> dict:
    """The same closed-loop clients, in process and without HTTP: the engine's share alone."""
    import asyncio

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_suite

    gpu_suite.ensure_importable()
    from xllm.model.checkpoint import load_model

    model = load_model(model_dir, device="cpu")
    engine = gpu_suite.make_engine(model, 16, model.max_model_len, None)
    engine.start()

    async def run_warmup() -> None:
        record: dict = {}
        request = gpu_suite.text_request(10**6, max_tokens)
        handle = gpu_suite.submit(engine, request, asyncio.get_running_loop())
        await gpu_suite.consume(handle, record)

    async def run(clients: int) -> dict:
        loop = asyncio.get_running_loop()
        todo = list(range(requests[clients]))
        ttfts, tokens = [], 0

        async def client() -> None:
            nonlocal tokens
            while todo:
                i = todo.pop()
                start = time.perf_counter()
                record: dict = {}
                handle = gpu_suite.submit(engine, gpu_suite.text_request(i, max_tokens), loop)
                await gpu_suite.consume(handle, record)
                if "error" in record:
                    raise RuntimeError(record["error"])
                ttfts.append(1000 * (record["first"] - start))
                tokens += record["tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return {
            "output_tokens_per_s": round(tokens / (time.perf_counter() - start), 1),
            "ttft_p50_ms": round(statistics.median(ttfts), 2),
        }

    async def all_rounds() -> dict:
        await run_warmup()
        out: dict = {1: [], 16: []}
        for _ in range(rounds):
            for clients in (1, 16):
                result = await run(clients)
                out[clients].append(result)
                print(f"engine only, clients {clients:2d}: {result}", flush=True)
        return out

    runs = gpu_suite.run_with_engine(engine, all_rounds)
    return {"torch_threads": torch.get_num_threads(), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: a fresh tiny model")
    parser.add_argument("--url", default=None, help="bench a running server instead")
    parser.add_argument("--rounds", type=int, default=2)
    # 20 requests per client at 16 clients: with 6 (96 requests) the start-up burst, 16
    # requests sent within a millisecond, is a sixth of the samples and the TTFT p50 measures
    # it more than the steady state (docs/PERFORMANCE.md has both)
    parser.add_argument("--requests-1", type=int, default=48, help="requests at 1 client")
    parser.add_argument("--requests-16", type=int, default=320, help="requests at 16 clients")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--mix",
        action="append",
        default=None,
        help=f"an `xllm bench --mix`, one run each (repeatable; default: {' '.join(MIXES)})",
    )
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="K=V", help="server environment"
    )
    parser.add_argument(
        "--server-flag", action="append", default=[], help="extra `xllm serve` flag (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "./bench-out")))
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="drive the engine in this process, no HTTP (needs --model)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(item.split("=", 1) for item in args.server_env)
    if args.engine_only:
        if args.model is None:
            raise SystemExit("--engine-only needs --model")
        requests = {1: args.requests_1, 16: args.requests_16}
        result = engine_only(args.model, requests, args.max_tokens, args.rounds)
        one = statistics.median(r["output_tokens_per_s"] for r in result["runs"][1])
        many = statistics.median(r["output_tokens_per_s"] for r in result["runs"][16])
        ttft1 = statistics.median(r["ttft_p50_ms"] for r in result["runs"][1])
        ttft16 = statistics.median(r["ttft_p50_ms"] for r in result["runs"][16])
        result.update(
            throughput_ratio=round(many / one, 2),
            ttft_ratio=round(ttft16 / ttft1, 2),
            loadavg=[round(x, 2) for x in os.getloadavg()],
        )
        (args.out / "cpu_targets_engine_only.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"engine only ({result['torch_threads']} torch threads): 1 client {one:.1f} tok/s, "
            f"TTFT p50 {ttft1:.1f} ms; 16 clients {many:.1f} tok/s, TTFT p50 {ttft16:.1f} ms; "
            f"throughput x{result['throughput_ratio']}, TTFT x{result['ttft_ratio']}"
        )
        return 0

    process = None
    server_command = None
    if args.url is None:
        model = args.model
        if model is None:
            model = Path(tempfile.mkdtemp(prefix="xllm-tiny-"))
            subprocess.run(xllm("init-tiny", "--out", str(model)), check=True, capture_output=True)
        flags = [f for flag in args.server_flag for f in shlex.split(flag)]
        process, url, server_command = start_server(
            model, env, ["--log-format", "json", *flags], args.out / "cpu_targets_server.log"
        )
    else:
        url = args.url.rstrip("/")
    load_start = os.getloadavg()
    mixes: dict[str, dict] = {}
    try:
        for mix in args.mix or MIXES:
            mixes[mix] = run_mix(mix, url, process, args)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    summary = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "server_command": " ".join(server_command[1:]) if server_command else url,
        "server_env": env,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_pressure": cpu_pressure(),
        "mixes": mixes,
    }
    (args.out / "cpu_targets.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"{'mix':<10}{'1c tok/s':>10}{'1c TTFT':>9}{'16c tok/s':>11}{'16c TTFT':>10}"
        f"{'tok/s x':>9}{'TTFT x':>8}  targets (x{TARGET_THROUGHPUT:g}, x{TARGET_TTFT:g})"
    ]
    for mix, result in mixes.items():
        one, many = result["clients"][1], result["clients"][16]
        lines.append(
            f"{mix:<10}{one['output_tokens_per_s']:>10.1f}{one['ttft_p50_ms']:>9.1f}"
            f"{many['output_tokens_per_s']:>11.1f}{many['ttft_p50_ms']:>10.1f}"
            f"{result['throughput_ratio']:>9.2f}{result['ttft_ratio']:>8.2f}  "
            f"{'met' if result['throughput_target_met'] else 'MISSED'} / "
            f"{'met' if result['ttft_target_met'] else 'MISSED'}"
        )
    lines.append("server stage p50 ms at 1 / 16 clients (last round):")
    for mix, result in mixes.items():
        lines.append(f"  {mix}: {stage_line(result['stages'])}")
    lines.append(
        f"load average {summary['loadavg_start']} -> {summary['loadavg_end']} "
        f"on {os.cpu_count()} CPUs; CPU pressure: {summary['cpu_pressure']}"
    )
    print("\n".join(lines))
    return 0


def run_mix(mix: str, url: str, process, args: argparse.Namespace) -> dict:
    """`--rounds` rounds of 1 and 16 clients on one mix: the medians, ratios and targets."""
    runs: dict[int, list[dict]] = {1: [], 16: []}
    commands = {}
    slug = mix.replace("=", "").replace(",", "_")
    for round_ in range(args.rounds):
        for clients in (1, 16):
            report = args.out / f"cpu_targets_{slug}_c{clients}_r{round_}.json"
            requests = args.requests_1 if clients == 1 else args.requests_16
            command = xllm(
                "bench",
                "--url",
                url,
                "--concurrency",
                str(clients),
                "--requests",
                str(requests),
                "--max-tokens",
                str(args.max_tokens),
                "--mix",
                mix,
                "--seed",
                str(round_),
                "--no-progress",
                "--json",
                str(report),
            )
            commands[clients] = " ".join(shlex.quote(c) for c in command[1:])
            cpu_before = process_cpu_seconds(process)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            cpu_after = process_cpu_seconds(process)
            server = json.loads(report.read_text())["server"]
            if cpu_before is not None and cpu_after is not None:
                # CPU the server got during the run, in cores (2 = both of a 2-CPU machine)
                server["server_cpu_cores"] = round(
                    (cpu_after - cpu_before) / server["duration_s"], 2
                )
            if server["errors"]:
                raise SystemExit(f"{mix}: {server['errors']} errors: {server['error_messages']}")
            runs[clients].append(server)
            print(
                f"{mix} round {round_} clients {clients:2d}: "
                f"{server['output_throughput']:8.1f} tok/s, TTFT p50 "
                f"{server['ttft_ms']['p50']:7.1f} ms, TPOT p50 {server['tpot_ms']['p50']:6.2f} ms, "
                f"server CPU {server.get('server_cpu_cores', '-')} cores",
                flush=True,
            )

    def median(clients: int, pick) -> float:
        return statistics.median(pick(r) for r in runs[clients])

    result: dict = {"clients": {}}
    for clients in (1, 16):
        result["clients"][clients] = {
            "output_tokens_per_s": median(clients, lambda r: r["output_throughput"]),
            "ttft_p50_ms": median(clients, lambda r: r["ttft_ms"]["p50"]),
            "tpot_p50_ms": median(clients, lambda r: r["tpot_ms"]["p50"]),
            "itl_p50_ms": median(clients, lambda r: r["itl_ms"]["p50"]),
            "server_cpu_cores": median(clients, lambda r: r.get("server_cpu_cores") or 0),
        }
    one, many = result["clients"][1], result["clients"][16]
    throughput_ratio = many["output_tokens_per_s"] / one["output_tokens_per_s"]
    ttft_ratio = many["ttft_p50_ms"] / one["ttft_p50_ms"]
    result.update(
        {
            "bench_commands": commands,
            "throughput_ratio": round(throughput_ratio, 2),
            "ttft_ratio": round(ttft_ratio, 2),
            "throughput_target_met": throughput_ratio >= TARGET_THROUGHPUT,
            "ttft_target_met": ttft_ratio <= TARGET_TTFT,
            # the server's stage times of the last round (xllm bench's `stages`)
            "stages": {c: runs[c][-1].get("stages", []) for c in runs},
            "runs": {c: runs[c] for c in runs},
        }
    )
    return result


def stage_line(stages: dict[int, list[dict]]) -> str:
    """'encode(image) 4.1/30.2, prefill 9.0/55.1, ...': p50 at 1 and at 16 clients."""
    at = {c: {(r["stage"], r["modality"]): r["p50_ms"] for r in rows} for c, rows in stages.items()}
    cells = []
    for key in at.get(1, {}):
        stage, modality = key
        name = f"{stage}({modality})" if modality else stage
        many = at.get(16, {}).get(key)
        cells.append(f"{name} {at[1][key]:.1f}/{'-' if many is None else format(many, '.1f')}")
    return ", ".join(cells) or "(no /metrics)"


if __name__ == "__main__":
    sys.exit(main())
