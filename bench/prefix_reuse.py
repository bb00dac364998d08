#!/usr/bin/env python3
"""Prefix reuse, side by side in one run: the TTFT of a chat's turn 2 right after its turn 1 ran,
against that of an equally long turn 2 nothing of which was ever computed.

    python bench/prefix_reuse.py                     # the default model (`xllm serve`)
    python bench/prefix_reuse.py --model DIR --rounds 5 --server-flag=--device=cuda
    python bench/prefix_reuse.py --tiny              # a tiny random model made on the spot
    python bench/prefix_reuse.py --url URL           # a running server

Each round: chat A's turn 1 (a ~300-token system prompt, an image, a question) runs; then, in
alternating order, A's turn 2 (the history resent with a follow-up: its first positions are in a
KV slot) and turn 2 of a chat B never seen (its own system prompt salt and image, the same
lengths: nothing to reuse, its image not encoded yet). The images are media handles (uploaded
before the timed requests, as a client that uploads once does; `--media inline` sends them as
data URIs every turn). TTFT is request sent -> first SSE chunk of /v1/chat/completions,
greedy. Reports the medians, their ratio (target <= 0.25), and each turn's prompt_tokens and
cached_tokens. Writes $OUT/prefix_reuse.json (default ./bench-out).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_targets import free_port, xllm

TARGET_RATIO = 0.25
FILLER = (
    "You are a careful visual assistant for a museum's catalogue team. Describe what the "
    "picture shows: the objects, their shapes, colours, sizes and positions, and how they relate "
    "to each other. Say when you are unsure, and never invent details that are not visible. "
    "Answer in short, plain sentences, and keep to what was asked. "
)


def system_prompt(salt: str, words: int) -> str:
    """A system prompt of about `words` words (~1.3 tokens each) that starts with `salt`, so
    that two salts share no prefix beyond the chat template's first tokens."""
    text = f"[{salt}] "
    while len(text.split()) < words:
        text += FILLER
    return " ".join(text.split()[:words])


def image_part(url: str, seed: int, media: str) -> dict:
    """The seed's picture as a content part: a media handle (uploaded here), or a data URI."""
    from xllm.clients.bench.media import make_png

    png = make_png(seed)
    if media == "inline":
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        return {"type": "image_url", "image_url": {"url": uri}}
    files = {"file": (f"bench-{seed}.png", png, "image/png")}
    reply = httpx.post(f"{url}/v1/files", data={"purpose": "vision"}, files=files, timeout=120)
    if reply.status_code != 200:
        raise SystemExit(f"the upload failed with {reply.status_code}: {reply.text[:500]}")
    return {"type": "file", "file": {"file_id": reply.json()["id"]}}


def turn1(salt: str, image: dict, words: int) -> list[dict]:
    return [
        {"role": "system", "content": system_prompt(salt, words)},
        {
            "role": "user",
            "content": [image, {"type": "text", "text": "Describe the picture."}],
        },
    ]


def turn2(first: list[dict], answer: str) -> list[dict]:
    follow_up = {"role": "user", "content": "What colour is the shape, in one word?"}
    return [*first, {"role": "assistant", "content": answer}, follow_up]


def ask(url: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    """(TTFT seconds, the answer, usage) of one streamed greedy request."""
    body = {
        "model": "xllm",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage, first = "", {}, None
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
        if reply.status_code != 200:
            reply.read()
            raise SystemExit(f"the server answered {reply.status_code}: {reply.text[:500]}")
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter() - start
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
            usage = chunk.get("usage") or usage
    assert first is not None, "no SSE chunk"
    return first, text, usage


def cached(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def start_server(model: Path | None, flags: list[str], log: Path):
    port = free_port()
    model_flags = ["--model", str(model)] if model is not None else []
    command = xllm("serve", *model_flags, "--port", str(port), *flags)
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # the default model may fetch its parts on first use
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit(f"the server did not get ready; see {log}")


def run(url: str, rounds: int, words: int, max_tokens: int, media: str) -> dict:
    # compile, allocator pools, first-use costs
    ask(url, turn1("warm-up", image_part(url, 10**6, media), words), 4)
    warm, cold, samples = [], [], []
    for r in range(rounds):
        first = turn1(f"chat {r:03d} A", image_part(url, 2 * r, media), words)
        t1, answer, usage1 = ask(url, first, max_tokens)
        # B: never seen (its own salt and image), as long as A's turn 2 (the same answer text)
        other = image_part(url, 2 * r + 1, media)
        fresh = turn2(turn1(f"chat {r:03d} B", other, words), answer)
        order = [("warm", turn2(first, answer)), ("cold", fresh)]
        if r % 2:
            order.reverse()
        sample: dict = {"turn1_ttft_ms": round(1000 * t1, 1), "turn1_usage": usage1}
        for name, messages in order:
            ttft, _, usage = ask(url, messages, 8)
            (warm if name == "warm" else cold).append(ttft)
            sample[name] = {
                "ttft_ms": round(1000 * ttft, 1),
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": cached(usage),
            }
        samples.append(sample)
        print(json.dumps({"round": r, **{k: sample[k] for k in ("warm", "cold")}}), flush=True)
    ratio = statistics.median(warm) / statistics.median(cold)
    return {
        "rounds": samples,
        "warm_turn2_ttft_p50_ms": round(1000 * statistics.median(warm), 1),
        "cold_turn2_ttft_p50_ms": round(1000 * statistics.median(cold), 1),
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "media": media,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the default model")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model made here")
    parser.add_argument("--url", default=None, help="bench a running server instead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--system-words", type=int, default=230, help="~300 tokens")
    parser.add_argument("--max-tokens", type=int, default=32, help="turn 1's answer")
    parser.add_argument("--media", choices=("handle", "inline"), default="handle")
    parser.add_argument(
        "--server-flag", action="append", default=[], help="extra `xllm serve` flag (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "./bench-out")))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    process = None
    url = args.url
    if url is None:
        model = args.model
        if args.tiny:
            model = Path(tempfile.mkdtemp(prefix="xllm-tiny-"))
            subprocess.run(xllm("init-tiny", "--out", str(model)), check=True)
        process, url = start_server(model, args.server_flag, args.out / "prefix_reuse_server.log")
    try:
        result = run(url, args.rounds, args.system_words, args.max_tokens, args.media)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    result.update(url=url if args.url else None, flags=args.server_flag)
    (args.out / "prefix_reuse.json").write_text(json.dumps(result, indent=2))
    print(
        f"turn 2 TTFT p50: after turn 1 {result['warm_turn2_ttft_p50_ms']} ms, never computed "
        f"{result['cold_turn2_ttft_p50_ms']} ms: ratio {result['ratio']} "
        f"(target <= {TARGET_RATIO}: {'met' if result['met'] else 'missed'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
