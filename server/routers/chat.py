"""POST /chat: multipart (or urlencoded) form with files; JSON reply or an SSE stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter, ValidationError

from xllm.model.sampling import (
    MAX_TOKENS,
    MIN_TOKENS,
    PENALTY,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_K,
    TOP_P,
)
from xllm.server.deps import (
    OwnerDep,
    RequestIdDep,
    ServiceDep,
    until_disconnected,
)
from xllm.server.engine.events import ErrorEvent, Event, FinishEvent
from xllm.server.errors import ServingError
from xllm.server.protocol import (
    ChatReply,
    ChatStreamEvent,
    ChatTurn,
    ResponseFormat,
    UsageInfo,
)
from xllm.server.routers.responses import MEDIA_ERRORS, STREAM_REPLY, sse, sse_error
from xllm.server.serving import ChatInput, ChatService, Generation, MediaInput
from xllm.server.structured import response_format_grammar

router = APIRouter(tags=["chat"])

_TURNS = TypeAdapter(list[ChatTurn])


def _turns(prompt: str | None, messages: str | None) -> list[tuple[str, str]]:
    if (prompt is None) == (messages is None):
        raise ServingError("give exactly one of 'prompt' and 'messages'", 422)
    if prompt is not None:
        return [("user", prompt)]
    try:
        turns = _TURNS.validate_json(messages or "")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ServingError(
            f"'messages' must be a JSON array of {{role, content}}: {where}: {first['msg']}",
            400,
        ) from None
    if not turns:
        raise ServingError("'messages' is empty", 400)
    return [(t.role, t.content) for t in turns]


def _stop(values: list[str] | None) -> list[str] | None:
    """`stop` repeated, or one JSON list of strings; a JSON list of anything else is a 422.

    A single value that is not a JSON list (e.g. `[END]`) is a literal stop string.
    """
    if not values:
        return None
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except (json.JSONDecodeError, RecursionError):  # "[[[[…" nested past the parser's depth
            return values
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ServingError("'stop' must be strings or a JSON list of strings", 422)
        return parsed
    return values


async def _files(kind: str, files: list[UploadFile] | None) -> list[MediaInput]:
    return [MediaInput(kind, await f.read()) for f in files or []]  # type: ignore[arg-type]


@router.post(
    "/chat",
    response_model=ChatReply,
    responses={
        **MEDIA_ERRORS,
        200: {
            "description": "The reply; with stream=true SSE ChatStreamEvents, then [DONE]",
            **STREAM_REPLY,
        },
    },
    summary="Chat with images, audio and video",
)
async def chat(
    request: Request,
    service: ServiceDep,
    request_id: RequestIdDep,
    prompt: Annotated[str | None, Form(description="one user turn")] = None,
    messages: Annotated[
        str | None, Form(description="JSON array of {role: system|user|assistant, content}")
    ] = None,
    image: Annotated[list[UploadFile] | None, File(description="image files (repeatable)")] = None,
    audio: Annotated[list[UploadFile] | None, File(description="audio files (repeatable)")] = None,
    video: Annotated[list[UploadFile] | None, File(description="video files (repeatable)")] = None,
    file_id: Annotated[
        list[str] | None,
        Form(
            description="media handles from POST /v1/files (repeatable); each binds, in order, "
            "after the uploaded files of its kind"
        ),
    ] = None,
    owner: OwnerDep = "",
    stream: Annotated[bool, Form()] = False,
    max_tokens: Annotated[int | None, Form(**MAX_TOKENS.bounds)] = None,
    min_tokens: Annotated[int | None, Form(**MIN_TOKENS.bounds)] = None,
    ignore_eos: Annotated[bool | None, Form()] = None,
    temperature: Annotated[float | None, Form(**TEMPERATURE.bounds)] = None,
    top_p: Annotated[float | None, Form(**TOP_P.bounds)] = None,
    top_k: Annotated[int | None, Form(**TOP_K.bounds)] = None,
    repetition_penalty: Annotated[float | None, Form(**REPETITION_PENALTY.bounds)] = None,
    presence_penalty: Annotated[float | None, Form(**PENALTY.bounds)] = None,
    frequency_penalty: Annotated[float | None, Form(**PENALTY.bounds)] = None,
    seed: Annotated[int | None, Form()] = None,
    stop: Annotated[list[str] | None, Form(description="repeatable, or a JSON list")] = None,
    response_format: Annotated[
        str | None,
        Form(
            description='JSON, as in /v1/chat/completions: {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name", "schema"}}'
        ),
    ] = None,
):
    uploads = {
        "image": await _files("image", image),
        "audio": await _files("audio", audio),
        "video": await _files("video", video),
    }
    for handle in file_id or []:
        item = await service.file_media(owner, handle)
        uploads[item.kind].append(item)
    media = [item for items in uploads.values() for item in items]
    overrides = {
        "max_tokens": max_tokens,
        "min_tokens": min_tokens,
        "ignore_eos": ignore_eos,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "seed": seed,
        "stop": _stop(stop),
    }
    chat_input = ChatInput(_turns(prompt, messages), media, overrides, request_id)
    chat_input.grammar = response_format_grammar(_response_format(response_format))
    if stream:
        generation = await until_disconnected(request, service.start(chat_input))
        return StreamingResponse(chat_event_stream(generation), media_type="text/event-stream")
    return await until_disconnected(request, _complete(service, chat_input))


def _response_format(text: str | None) -> ResponseFormat | None:
    if text is None:
        return None
    try:
        return ResponseFormat.model_validate_json(text)
    except ValidationError as exc:
        raise ServingError(f"response_format: {exc.errors()[0]['msg']}", 400) from None


async def _complete(service: ChatService, chat_input: ChatInput) -> ChatReply:
    done = await service.complete(chat_input)
    return ChatReply(
        id=chat_input.request_id,
        model=service.model_name,
        text=done.text,
        finish_reason=done.finish_reason,  # type: ignore[arg-type]
        usage=UsageInfo.of(done.usage),
    )


async def chat_event_stream(generation: Generation) -> AsyncIterator[str]:
    """The /chat stream's SSE body: events already waiting go out in one write, then [DONE]."""
    try:
        async for batch in generation.event_batches():
            chunk = "".join(_sse_event(generation.request_id, event) for event in batch)
            if chunk:
                yield chunk
        yield sse("[DONE]")
    finally:
        generation.cancel()  # client gone mid-stream: free the slot at the next step


def _sse_event(request_id: str, event: Event) -> str:
    """One engine event as SSE (empty for a token that completes no text yet)."""
    if isinstance(event, ErrorEvent):
        return sse_error(event)
    if isinstance(event, FinishEvent):
        last = ChatStreamEvent(
            id=request_id,
            delta=event.text,
            finish_reason=event.finish_reason,  # type: ignore[arg-type]
            usage=UsageInfo.of(event.usage),
        )
        return sse(last.model_dump_json(exclude_none=True))
    if not event.text:
        return ""
    return sse(ChatStreamEvent(id=request_id, delta=event.text).model_dump_json(exclude_none=True))
