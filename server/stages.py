"""Where one request's time went: its stage seconds, for its access-log line.

The request context middleware opens a `RequestStages` for every HTTP request (a context
variable: the route's tasks, the streaming body's included, see the same object); the serving
layer adds what it measures (media fetch, decode and preprocess, by modality) and what the
engine reports with the request's final event (queue wait, encode, prefill, first token,
decode). The Prometheus histograms of the same stages are observed where they are measured.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from xllm.model.preprocess import PreparedMedia

_current: ContextVar[RequestStages | None] = ContextVar("xllm_request_stages", default=None)


@dataclass
class RequestStages:
    seconds: dict[str, float] = field(default_factory=dict)  # stage name -> seconds

    def add(self, stage: str, seconds: float) -> None:
        """Stages a request passes several times (two images' decoding) add up."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def milliseconds(self) -> dict[str, float]:
        return {stage: round(1000 * s, 2) for stage, s in self.seconds.items()}


def open_stages() -> RequestStages:
    """A new record for the request now being handled (the middleware's)."""
    stages = RequestStages()
    _current.set(stages)
    return stages


def add_stage(stage: str, seconds: float) -> None:
    """Count `seconds` towards the current request's `stage` (nothing outside a request)."""
    stages = _current.get()
    if stages is not None:
        stages.add(stage, seconds)


def add_media_stages(prepared: list[PreparedMedia]) -> None:
    """The decode and preprocess seconds of a request's media, as `<modality>_decode` etc."""
    for item in prepared:
        add_stage(f"{item.kind}_decode", item.decode_seconds)
        add_stage(f"{item.kind}_preprocess", item.preprocess_seconds)


def add_engine_stages(seconds: dict[str, float]) -> None:
    """The engine's stages of the request (from a final event). The n choices of one request
    each report theirs: a stage counts once, as the first choice to report it had it (only
    choice 0 prefills, and reports queue, encode and prefill)."""
    stages = _current.get()
    if stages is not None:
        for stage, value in seconds.items():
            stages.seconds.setdefault(stage, value)
