"""`xllm bench`: a load generator for a running xllm server, in the manner of `vllm bench serve`.

    xllm bench --url http://127.0.0.1:8000 --concurrency 16 --requests 128 --max-tokens 64 \\
        --mix image=1,audio=1,video=1,text=1 --json out.json
    xllm bench --url ... --request-rate 4 --requests 200          # Poisson arrivals (seeded)
    xllm bench --url ... --concurrency 16 --baseline --model DIR  # + naive HF `generate`
    xllm bench --url http://127.0.0.1:8080 --api openai --mix text=1  # any OpenAI-API server

Every request is a streaming `POST /chat` with `ignore_eos=true`, greedy decoding and a fixed
`max_tokens`, so lengths are comparable across runs and servers. Reported: p50/p95/p99 (and mean)
of TTFT, ITL, TPOT and end-to-end latency, output tokens/s, requests/s and errors, as a table and
as JSON (`--json`). `--baseline` sends the same requests (same prompts, same media) one at a time
through HF `generate` in this process (`xllm.model.evaluation.bench_baseline`); the report then
carries the ratios server/baseline for throughput and TTFT p50. The server's own stage times
(media fetch, decode, preprocess, queue, encode, prefill, first token, decode) come from its
/metrics read before and after the run: p50/p95 per stage and modality (`stages`).

    workload    request kinds, prompts and media (`build_requests`)
    media       media made in memory (PNG, WAV, MP4)
    load        the load generator (`run_load`)
    report      per-request results and the figures of a run (`summarize`, `format_report`)
    stages      the server's stage histograms over the run (`stage_summary`)
    cli         the `xllm bench` command
"""

from xllm.clients.bench.cli import register, run_bench

__all__ = ["register", "run_bench"]
