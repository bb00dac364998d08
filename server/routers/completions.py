"""OpenAI's legacy Completions: POST /v1/completions (raw text prompts, stream and not)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from xllm.server.deps import RequestIdDep, ServiceDep, until_disconnected
from xllm.server.engine.events import (
    ErrorEvent,
    Event,
    FinishEvent,
    PromptLogprobsEvent,
    TokenLogprobs,
    Usage,
)
from xllm.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TextCompletion,
    UsageInfo,
)
from xllm.server.routers.responses import STREAM_REPLY, TEXT_ERRORS, sse, sse_error
from xllm.server.serving import ChatInput, ChatService, Generation, merged_event_batches

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/completions",
    response_model=TextCompletion,
    responses={**TEXT_ERRORS, 200: STREAM_REPLY},
    summary="Complete raw text prompts (no chat template); a list of prompts: a choice each",
)
async def completions(
    body: CompletionRequest, request: Request, service: ServiceDep, request_id: RequestIdDep
):
    inputs = service.from_completion(body, f"cmpl-{request_id}")
    created = int(time.time())
    generations = await until_disconnected(request, service.start_all(inputs))
    inputs = [chat for chat in inputs for _ in range(chat.n)]  # per choice: prompt i's n in a row
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(service, inputs, generations, body, created, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    return await until_disconnected(request, _complete(service, inputs, generations, body, created))


async def _complete(
    service: ChatService,
    inputs: list[ChatInput],
    generations: list[Generation],
    body: CompletionRequest,
    created: int,
) -> TextCompletion:
    try:
        done = [await generation.collect() for generation in generations]
    finally:
        for generation in generations:
            generation.cancel()
    choices = []
    for index, (chat_input, completion) in enumerate(zip(inputs, done, strict=True)):
        echoed = chat_input.prompt if body.echo else ""
        logprobs = None
        if body.logprobs is not None:  # with echo the prompt's tokens first
            logprobs = CompletionLogprobs.of(completion.prompt_logprobs + completion.logprobs)
        choices.append(
            CompletionChoice(
                index=index,
                text=(echoed or "") + completion.text,
                finish_reason=completion.finish_reason,  # type: ignore[arg-type]
                logprobs=logprobs,
            )
        )
    return TextCompletion(
        id=inputs[0].request_id,
        created=created,
        model=service.model_name,
        choices=choices,
        usage=UsageInfo.of(sum((c.usage for c in done), Usage(0, 0))),
    )


async def _chunks(
    service: ChatService,
    inputs: list[ChatInput],
    generations: list[Generation],
    body: CompletionRequest,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Text deltas per choice (each with the logprobs of its tokens when asked), a choice's
    finish_reason with its last chunk, the usage of all choices last when asked, then [DONE]."""
    completion_id = inputs[0].request_id
    pending: list[list[TokenLogprobs]] = [[] for _ in inputs]  # tokens whose text is not out yet
    reported = [b""] * len(inputs)  # per choice, the bytes of the tokens reported (text_offset)
    usage = Usage(0, 0)  # of the choices that ended

    def chunk(index: int, text: str, finish: str | None = None) -> str:
        logprobs = None
        if body.logprobs is not None and (pending[index] or finish):
            logprobs = CompletionLogprobs.of(pending[index], reported[index])
            reported[index] += b"".join(e.token for e in pending[index])
            pending[index] = []
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        return sse(_body(service, completion_id, created, [choice]).model_dump_json())

    def render(index: int, event: Event) -> str:
        nonlocal usage
        if isinstance(event, ErrorEvent):
            return sse_error(event)
        if isinstance(event, PromptLogprobsEvent):  # echo + logprobs: the prompt's chunk
            pending[index] = list(event.entries)
            return chunk(index, inputs[index].prompt or "")
        if event.logprobs is not None:
            pending[index].append(event.logprobs)
        if isinstance(event, FinishEvent):
            usage += event.usage
            return chunk(index, event.text, event.finish_reason)
        return chunk(index, event.text) if event.text else ""

    try:
        if body.echo and body.logprobs is None:  # else with the prompt's logprobs, see render
            yield "".join(chunk(i, c.prompt or "") for i, c in enumerate(inputs))
        async for index, batch in merged_event_batches(generations):
            text = "".join(render(index, event) for event in batch)
            if text:
                yield text
        if include_usage:
            last = _body(service, completion_id, created, [])
            last.usage = UsageInfo.of(usage)
            yield sse(last.model_dump_json())
        yield sse("[DONE]")
    finally:
        for generation in generations:
            generation.cancel()


def _body(
    service: ChatService, completion_id: str, created: int, choices: list[CompletionChoice]
) -> TextCompletion:
    return TextCompletion(
        id=completion_id, created=created, model=service.model_name, choices=choices
    )
