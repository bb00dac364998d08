"""Prometheus metrics (`GET /metrics`), on a registry per app so several apps can coexist."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xllm.server.engine.contract import EngineObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A request's stages, TTFT included: finer (a superset of LATENCY_BUCKETS), for the quantiles
# `xllm bench` estimates from them
STAGE_BUCKETS = tuple(
    sorted({*LATENCY_BUCKETS, 0.0005, 0.001, 0.0025, 0.0075, 0.015, 0.035, 0.075, 0.15, 0.35})
)


class Metrics(EngineObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("xllm_num_requests_running", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge(
            "xllm_num_requests_waiting", "Requests accepted and not yet running", registry=r
        )
        self.kv_usage = Gauge(
            "xllm_kv_cache_usage_ratio", "Used fraction of the KV-cache positions", registry=r
        )
        self.ttft = Histogram(
            "xllm_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "xllm_inter_token_latency_seconds",
            "Between streamed tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "xllm_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "xllm_request_queue_time_seconds",
            "Handed to the engine (media prepared) to admission into a slot",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.encode_time = Histogram(
            "xllm_request_encode_time_seconds",
            "Admission to the prompt laid out: media encoded (encoder + X2L interface, batched "
            "with the requests admitted alongside) or found cached, the prompt embedded",
            ["modality"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            "xllm_request_prefill_time_seconds",
            "Prompt laid out to its first token (prefill chunks, and the steps between them)",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            "xllm_request_decode_time_seconds",
            "First token to last token",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.encoder = Histogram(
            "xllm_encoder_seconds",
            "Encoder + X2L interface time per batched call",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Per-request media stages in the API process, before the engine sees the request.
        self.media_fetch = Histogram(
            "xllm_media_fetch_seconds",
            "Downloading one remote media URL (redirects included)",
            ["modality"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.media_prepare = Histogram(
            "xllm_request_media_prepare_seconds",
            "Arrival to a request's media all decoded and preprocessed (waits for a thread of "
            "the media pool included), per modality it has",
            ["modality"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.media_decode = Histogram(
            "xllm_media_decode_seconds",
            "Container/codec decoding of one media item",
            ["modality"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.media_preprocess = Histogram(
            "xllm_media_preprocess_seconds",
            "Resizing/normalising pixels or computing log-mel features of one media item",
            ["modality"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.generated = Counter("xllm_generated_tokens_total", "Tokens generated", registry=r)
        self.prefilled = Counter(
            "xllm_prefill_tokens_total",
            "Prompt positions computed by prefill forwards (n choices of a prompt: once)",
            registry=r,
        )
        self.prompt = Counter("xllm_prompt_tokens_total", "Prompt positions processed", registry=r)
        self.prefix_queries = Counter(
            "xllm_prefix_cache_queries",
            "Prompt positions looked up in the KV cache (prefix reuse)",
            registry=r,
        )
        self.prefix_hits = Counter(
            "xllm_prefix_cache_hits",
            "Prompt positions found in the KV cache, not prefilled again",
            registry=r,
        )
        self.requests = Counter(
            "xllm_requests_total", "Finished HTTP requests", ["endpoint", "status"], registry=r
        )

    def media_prepared(self, kinds: set[str], seconds: float) -> None:
        """A request with media of these kinds had them all prepared `seconds` after arrival."""
        for kind in sorted(kinds):
            self.media_prepare.labels(modality=kind).observe(seconds)

    def media_stages(self, modality: str, decode: float, preprocess: float) -> None:
        self.media_decode.labels(modality=modality).observe(decode)
        self.media_preprocess.labels(modality=modality).observe(preprocess)

    # EngineObserver
    def queue_time(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def encoder_time(self, modality: str, seconds: float) -> None:
        self.encoder.labels(modality=modality).observe(seconds)

    def request_encode(self, modality: str, seconds: float) -> None:
        self.encode_time.labels(modality=modality).observe(seconds)

    def request_prefill(self, seconds: float) -> None:
        self.prefill_time.observe(seconds)

    def request_decode(self, seconds: float) -> None:
        self.decode_time.observe(seconds)

    def prefill(self, positions: int) -> None:
        self.prefilled.inc(positions)

    def request_done(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt.inc(prompt)
        if generated:
            self.generated.inc(generated)

    def prefix_cache(self, queried: int, hit: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
