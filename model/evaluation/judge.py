"""The LLaVA-Bench judge: review prompts, score parsing, and a cached, rate-limited client.

The protocol is LLaVA's (`llava/eval/eval_gpt_review_bench.py`, `eval_gpt_review_visual.py`,
`table/rule.json`, Apache-2.0): the judge gets the system prompt below and one user message with
[Context] (captions; with boxes for the COCO set), [Question], [Assistant 1] (the reference
answer), [Assistant 2] (the candidate's) and [System] (the rule), and answers with the two scores
(1-10) on its first line, then an explanation. The relative score is candidate / reference * 100.

Judge calls go to any OpenAI-compatible `/v1/chat/completions`. Replies are cached on disk by
the SHA-256 of the request body (model, messages, temperature, max_tokens), so a second run
makes no calls; failures (429, 5xx, 408, timeouts, dropped connections) are retried with
exponential backoff (honouring Retry-After); at most `concurrency` requests are in flight and
at most `rps` start per second.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
ROLE = "Assistant"

_RATE = (
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score "
    "indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were "
    "presented does not affect your judgment."
)
_ASKED = (
    "We would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above. The user asks the question on observing an image. "
)
# LLaVA-Bench (COCO): captions and bounding boxes ("conv", "detail", "complex" in rule.json)
RULE_COCO = (
    _ASKED + "For your reference, the visual content in the image is represented with five "
    "descriptive sentences describing the same image and the bounding box coordinates of each "
    "object in the scene. These coordinates are in the form of bounding boxes, represented as "
    "(x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These values correspond to the "
    "top left x, top left y, bottom right x, and bottom right y. \n" + _RATE
)
# LLaVA-Bench (in the wild): captions only ("llava_bench_*" in rule.json)
RULE_BENCH = (
    _ASKED + "For your reference, the visual content in the image is represented with a few "
    "sentences describing the image. \n" + _RATE
)
CATEGORY_ALIASES = {"conv": "conversation", "conversation": "conversation"}
RULE_KEYS = {"conversation": "conv"}  # our category name -> rule.json's


def canonical_category(category: str | None) -> str:
    category = (category or "conversation").strip().lower()
    return CATEGORY_ALIASES.get(category, category)


def load_rules(path: Path) -> dict[str, str]:
    """A LLaVA `rule.json` -> {key: prompt} (keys as in the file: conv, llava_bench_conv, ...)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {key: value["prompt"] for key, value in data.items() if isinstance(value, dict)}


def rule_for(category: str, with_boxes: bool, rules: dict[str, str] | None = None) -> str:
    """The [System] text for a question: COCO's rule when the context has boxes, else the
    in-the-wild rule; from `rules` (a loaded rule.json) when given."""
    if rules:
        key = RULE_KEYS.get(category, category)
        key = key if with_boxes else f"llava_bench_{key}"
        if key in rules:
            return rules[key]
        if "default" in rules:
            return rules["default"]
        raise KeyError(f"the rule file has no '{key}' rule")
    return RULE_COCO if with_boxes else RULE_BENCH


def format_boxes(boxes: Sequence[Any]) -> str:
    """LLaVA's box lines: 'category: [x1, y1, x2, y2]' (strings are kept as they are)."""
    lines = []
    for box in boxes:
        if isinstance(box, dict):
            lines.append(f"{box.get('category', 'object')}: {box.get('bbox')}")
        else:
            lines.append(str(box))
    return "\n".join(lines)


def review_content(
    question: str,
    reference: str,
    candidate: str,
    context: str | Sequence[str] = "",
    boxes: Sequence[Any] = (),
    rule: str = RULE_BENCH,
) -> str:
    """The judge's user message: [Context], [Question], [Assistant 1] = reference,
    [Assistant 2] = candidate, [System] = the rule."""
    captions = context if isinstance(context, str) else "\n".join(context)
    context_block = f"{captions}\n\n{format_boxes(boxes)}" if boxes else captions
    return (
        f"[Context]\n{context_block}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n"
        f"[{ROLE} 2]\n{candidate}\n\n[End of {ROLE} 2]\n\n"
        f"[System]\n{rule}\n\n"
    )


class ReviewParseError(ValueError):
    pass


SCORE = re.compile(r"^\d+(?:\.\d+)?$")


def parse_review(text: str) -> tuple[float, float]:
    """The two scores on a review's first line ('8 6', '8, 6', '8.5 7'), each within 1-10.

    LLaVA's `parse_score` rule (first line, commas as spaces, exactly two numbers), except that
    extra spaces are tolerated and anything else raises ReviewParseError (LLaVA would score
    it -1, -1 and average it in).
    """
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    parts = first.replace(",", " ").split()
    if len(parts) != 2 or not all(SCORE.match(p) for p in parts):
        raise ReviewParseError(f"first line is not two scores: {first[:80]!r}")
    a, b = float(parts[0]), float(parts[1])
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise ReviewParseError(f"scores outside 1-10: {first[:80]!r}")
    return a, b


# --- the client -----------------------------------------------------------------------------


class JudgeError(RuntimeError):
    """The judge refused in a way retrying cannot fix (bad key, unknown model, no URL)."""


@dataclass
class JudgeReply:
    text: str | None  # None when every attempt failed
    cached: bool = False
    error: str | None = None


def chat_completions_url(url: str) -> str:
    """A base URL ('http://host:8000', '.../v1') or the endpoint itself -> the endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xllm" / "judge"


class RateLimiter:
    """At most `rps` starts per second (evenly spaced); unlimited when rps is 0 or None."""

    def __init__(self, rps: float | None) -> None:
        self.interval = 1.0 / rps if rps else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


RETRY_STATUS = frozenset({408, 409, 429})


class JudgeClient:
    """Reviews through an OpenAI-compatible endpoint, with an on-disk cache.

    `url` may be None: then only cached reviews can be had (an offline re-run of a report).
    `calls` counts HTTP requests made (retries included); `cache_hits` the reviews read back.
    """

    def __init__(
        self,
        url: str | None,
        model: str,
        *,
        api_key: str | None = None,
        cache_dir: Path | None = None,
        concurrency: int = 4,
        rps: float | None = None,
        retries: int = 6,
        timeout: float = 120.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float = 0.2,
        max_tokens: int = 1024,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = chat_completions_url(url) if url else None
        self.model = model
        self.api_key = api_key
        self.cache_dir = cache_dir
        self.concurrency = max(1, concurrency)
        self.rps = rps
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.transport = transport
        self.calls = 0
        self.cache_hits = 0
        self.retried = 0

    # --- cache ---
    def request_body(self, content: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": content},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    @staticmethod
    def cache_key(body: dict[str, Any]) -> str:
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def cached(self, content: str) -> str | None:
        path = self._cache_path(self.cache_key(self.request_body(content)))
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (ValueError, KeyError, OSError):
            return None  # a damaged entry is asked again

    def _store(self, body: dict[str, Any], reply: str) -> None:
        path = self._cache_path(self.cache_key(body))
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{random.getrandbits(32):08x}.tmp")
        record = {"request": body, "reply": reply, "created": time.time()}
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    # --- calls ---
    def review_all(
        self, contents: Sequence[str], on_done: Callable[[], None] | None = None
    ) -> list[JudgeReply]:
        """Every content reviewed (cache first), in order; `on_done` after each one."""
        return asyncio.run(self._review_all(list(contents), on_done))

    async def _review_all(
        self, contents: list[str], on_done: Callable[[], None] | None
    ) -> list[JudgeReply]:
        replies: list[JudgeReply | None] = [None] * len(contents)
        missing = []
        for index, content in enumerate(contents):
            text = self.cached(content)
            if text is not None:
                self.cache_hits += 1
                replies[index] = JudgeReply(text, cached=True)
                if on_done:
                    on_done()
            else:
                missing.append(index)
        if missing and self.url is None:
            raise JudgeError(
                f"{len(missing)} review(s) are not in the judge cache and no --judge-url was given"
            )
        if missing:
            limiter = RateLimiter(self.rps)
            gate = asyncio.Semaphore(self.concurrency)
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            async with httpx.AsyncClient(
                headers=headers, timeout=self.timeout, transport=self.transport
            ) as http:

                async def one(index: int) -> None:
                    async with gate:
                        replies[index] = await self._review(http, limiter, contents[index])
                    if on_done:
                        on_done()

                await asyncio.gather(*(one(i) for i in missing))
        return [r for r in replies if r is not None]

    async def _review(
        self, http: httpx.AsyncClient, limiter: RateLimiter, content: str
    ) -> JudgeReply:
        assert self.url is not None
        body = self.request_body(content)
        error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
            await limiter.wait()
            self.calls += 1
            delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
            try:
                response = await http.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 200:
                    text = _reply_text(response)
                    if text is None:
                        return JudgeReply(None, error=f"bad reply: {response.text[:200]!r}")
                    self._store(body, text)
                    return JudgeReply(text)
                error = f"HTTP {status}: {response.text[:200]}"
                if status not in RETRY_STATUS and status < 500:
                    raise JudgeError(f"the judge at {self.url} answered {error}")
                after = _retry_after(response)
                if after is not None:
                    delay = min(after, self.max_backoff)
            if attempt < self.retries:
                await asyncio.sleep(delay)
        return JudgeReply(None, error=f"gave up after {self.retries + 1} attempts: {error}")


def _reply_text(response: httpx.Response) -> str | None:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
