"""OpenAI-compatible API: POST /v1/chat/completions (stream and not), GET /v1/models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from xllm.server.deps import (
    OwnerDep,
    RequestIdDep,
    RuntimeDep,
    ServiceDep,
    until_disconnected,
)
from xllm.server.engine.events import ErrorEvent, Event, FinishEvent, TokenLogprobs
from xllm.server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
)
from xllm.server.routers.responses import MEDIA_ERRORS, STREAM_REPLY, sse, sse_error
from xllm.server.serving import ChatService, Generation

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
async def models(runtime: RuntimeDep) -> ModelList:
    name = runtime.service.model_name if runtime.service else runtime.settings.model or "xllm"
    return ModelList(data=[ModelCard(id=str(name), created=int(time.time()))])


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**MEDIA_ERRORS, 200: STREAM_REPLY},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    service: ServiceDep,
    request_id: RequestIdDep,
    owner: OwnerDep,
):
    completion_id = f"chatcmpl-{request_id}"
    chat_input = await service.from_openai(body, completion_id, owner)
    created = int(time.time())
    if body.stream:
        generation = await until_disconnected(request, service.start(chat_input))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chunks(service, generation, created, include_usage), media_type="text/event-stream"
        )
    return await until_disconnected(request, _complete(service, chat_input, created))


async def _complete(service: ChatService, chat_input, created: int) -> ChatCompletion:
    done = await service.complete(chat_input)
    asked = chat_input.overrides.get("logprobs") is not None
    return ChatCompletion(
        id=chat_input.request_id,
        created=created,
        model=service.model_name,
        choices=[
            Choice(
                index=0,
                message=AssistantMessage(content=done.text),
                finish_reason=done.finish_reason,  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs.of(done.logprobs) if asked else None,
            )
        ],
        usage=UsageInfo.of(done.usage),
    )


async def _chunks(
    service: ChatService, generation: Generation, created: int, include_usage: bool
) -> AsyncIterator[str]:
    pending: list[TokenLogprobs] = []  # logprobs of tokens whose text is not out yet

    def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
        logprobs = None
        if pending:
            logprobs = ChoiceLogprobs.of(pending)
            pending.clear()
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        body = ChatCompletionChunk(
            id=generation.request_id,
            created=created,
            model=service.model_name,
            choices=[choice],
        )
        return sse(body.model_dump_json())

    def render(event: Event) -> str:
        if isinstance(event, ErrorEvent):
            return sse_error(event)
        if event.logprobs is not None:
            pending.append(event.logprobs)
        text = chunk(DeltaMessage(content=event.text)) if event.text else ""
        if isinstance(event, FinishEvent):
            text += chunk(DeltaMessage(), event.finish_reason)
            if include_usage:
                usage = ChatCompletionChunk(
                    id=generation.request_id,
                    created=created,
                    model=service.model_name,
                    choices=[],
                    usage=UsageInfo.of(event.usage),
                )
                text += sse(usage.model_dump_json())
        return text

    try:
        yield chunk(DeltaMessage(role="assistant", content=""))
        async for batch in generation.event_batches():  # several events: one write
            text = "".join(render(event) for event in batch)
            if text:
                yield text
        yield sse("[DONE]")
    finally:
        generation.cancel()
