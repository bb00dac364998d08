"""OpenAI's speech to text: POST /v1/audio/transcriptions (multipart form, stream and not).

There is no /v1/audio/translations: the model was trained to transcribe only (its one speech
instruction is ASR_INSTRUCTION); asked to translate it would answer untrained.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, StreamingResponse

from xllm.model.sampling import OPENAI_TEMPERATURE
from xllm.server.deps import RequestIdDep, ServiceDep, until_disconnected
from xllm.server.engine.events import ErrorEvent
from xllm.server.errors import ServingError
from xllm.server.protocol import (
    DurationUsage,
    Transcription,
    TranscriptionFormat,
    TranscriptionSegment,
    TranscriptionUsage,
    TranscriptionVerbose,
    TranscriptTextDelta,
    TranscriptTextDone,
)
from xllm.server.routers.responses import MEDIA_ERRORS, sse, sse_error
from xllm.server.transcription import (
    Transcriber,
    Transcript,
    TranscriptionInput,
    TranscriptionRun,
    to_srt,
    to_vtt,
)

router = APIRouter(prefix="/v1", tags=["openai"])

# the 200's other bodies: text and srt (text/plain), vtt, the stream
TEXT_BODIES = {
    kind: {"schema": {"type": "string"}} for kind in ("text/plain", "text/vtt", "text/event-stream")
}


@router.post(
    "/audio/transcriptions",
    response_model=Transcription | TranscriptionVerbose,
    responses={
        **MEDIA_ERRORS,
        200: {
            "description": "json / verbose_json; text, srt and vtt as text; with stream=true "
            "SSE transcript.text.delta events, then transcript.text.done",
            "content": TEXT_BODIES,
        },
    },
    summary="Transcribe speech of any length (split at pauses into utterance segments)",
)
async def transcriptions(
    request: Request,
    service: ServiceDep,
    request_id: RequestIdDep,
    file: Annotated[UploadFile, File(description="the audio (wav, flac, ogg, mp3, m4a)")],
    model: Annotated[str | None, Form()] = None,
    language: Annotated[
        str | None, Form(description="echoed in verbose_json; the model transcribes what it hears")
    ] = None,
    prompt: Annotated[
        str | None, Form(description="given to the model as a system turn before the instruction")
    ] = None,
    response_format: Annotated[TranscriptionFormat, Form()] = "json",
    temperature: Annotated[float | None, Form(**OPENAI_TEMPERATURE.bounds)] = None,
    stream: Annotated[bool, Form()] = False,
    timestamp_granularities: Annotated[
        list[str] | None,
        Form(alias="timestamp_granularities[]", description="'segment' only"),
    ] = None,
):
    if set(timestamp_granularities or ()) - {"segment"}:
        raise ServingError("only 'segment' timestamps are given (no word timestamps)", 400)
    if stream and response_format not in ("json", "text"):
        raise ServingError("stream=true takes response_format json or text", 400)
    job = TranscriptionInput(
        await file.read(),
        request_id,
        prompt,
        temperature,
        logprobs=response_format == "verbose_json",
    )
    transcriber = Transcriber(service)
    running = await until_disconnected(request, transcriber.start(job))
    if stream:
        return StreamingResponse(_events(running), media_type="text/event-stream")
    done = await until_disconnected(request, running.collect())
    if response_format == "text":
        return PlainTextResponse(done.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(to_srt(done))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(done), media_type="text/vtt")
    if response_format == "verbose_json":
        return _verbose(done, language, transcriber.temperature(temperature))
    return Transcription(text=done.text, usage=TranscriptionUsage.of(done.usage))


def _verbose(done: Transcript, language: str | None, temperature: float) -> TranscriptionVerbose:
    segments = [
        TranscriptionSegment(
            id=i,
            seek=part.seek,
            start=round(part.segment.start_seconds, 3),
            end=round(part.segment.end_seconds, 3),
            text=part.text,
            tokens=part.tokens,
            temperature=temperature,
            avg_logprob=part.avg_logprob,
            compression_ratio=part.compression_ratio,
        )
        for i, part in enumerate(done.segments)
    ]
    return TranscriptionVerbose(
        language=language or "unknown",
        duration=round(done.duration, 3),
        text=done.text,
        segments=segments,
        usage=DurationUsage(seconds=round(done.duration, 3)),
    )


async def _events(running: TranscriptionRun) -> AsyncIterator[str]:
    """transcript.text.delta events as the segments' text comes, in order, then
    transcript.text.done with the whole text and the usage (an error: the error event)."""
    try:
        async for delta in running.run():
            yield sse(TranscriptTextDelta(delta=delta).model_dump_json())
        done = running.transcript()
        yield sse(
            TranscriptTextDone(
                text=done.text, usage=TranscriptionUsage.of(done.usage)
            ).model_dump_json()
        )
    except ServingError as exc:
        yield sse_error(ErrorEvent(exc.message, exc.status, exc.type))
    finally:
        running.cancel()
