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
from xllm.server.engine.events import ErrorEvent, Event, FinishEvent, TokenLogprobs, Usage
from xllm.server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    ToolCall,
    ToolCallDelta,
    UsageInfo,
)
from xllm.server.routers.responses import MEDIA_ERRORS, STREAM_REPLY, sse, sse_error
from xllm.server.serving import (
    ChatInput,
    ChatService,
    Completion,
    Generation,
    merged_event_batches,
)
from xllm.server.structured import ToolCallStream, ToolPlan, call_id

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
    generations = await until_disconnected(request, service.start_choices(chat_input))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(
            service, completion_id, generations, created, include_usage, chat_input.tools
        )
        return StreamingResponse(chunks, media_type="text/event-stream")
    return await until_disconnected(request, _complete(service, chat_input, generations, created))


async def _complete(
    service: ChatService, chat_input: ChatInput, generations: list[Generation], created: int
) -> ChatCompletion:
    try:
        done = [await generation.collect() for generation in generations]
    finally:
        for generation in generations:
            generation.cancel()
    asked = chat_input.overrides.get("logprobs") is not None
    return ChatCompletion(
        id=chat_input.request_id,
        created=created,
        model=service.model_name,
        choices=[
            _choice(index, completion, chat_input.tools, asked)
            for index, completion in enumerate(done)
        ],
        usage=UsageInfo.of(sum((c.usage for c in done), Usage(0, 0))),  # the prompt once
    )


def _choice(index: int, completion: Completion, tools: ToolPlan | None, asked: bool) -> Choice:
    """A choice's text, or (with tools) its call: finish_reason "tool_calls" once the call is
    whole, "length" when the tokens ran out first (its arguments cut short)."""
    logprobs = ChoiceLogprobs.of(completion.logprobs) if asked else None
    finish = completion.finish_reason
    if tools is None:
        message = AssistantMessage(content=completion.text)
        return Choice(index=index, message=message, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
    call = ToolCallStream(tools)
    _, name, arguments = call.push(completion.text)
    arguments += call.finish()[1]
    if name is None:  # an answer in text ("auto"), or not even the function's name came out
        message = AssistantMessage(content=completion.text)
    else:
        function = FunctionCall(name=name, arguments=arguments)
        message = AssistantMessage(
            content=None, tool_calls=[ToolCall(id=call_id(), function=function)]
        )
    finish = "tool_calls" if call.complete else finish
    return Choice(index=index, message=message, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]


async def _chunks(
    service: ChatService,
    completion_id: str,
    generations: list[Generation],
    created: int,
    include_usage: bool,
    tools: ToolPlan | None,
) -> AsyncIterator[str]:
    """Per choice a role chunk, its deltas (with their tokens' logprobs when asked) and its
    finish_reason; the usage of all choices last when asked, then [DONE]. A tool call streams
    as OpenAI's tool_call deltas: the id and name first, then the arguments' text."""
    pending: list[list[TokenLogprobs]] = [[] for _ in generations]  # tokens whose text waits
    usage = Usage(0, 0)  # of the choices that ended
    calls = [ToolCallStream(tools) for _ in generations] if tools else []
    forced = tools is not None and not tools.auto  # a call, never text

    def call_delta(index: int, text: str, final: bool) -> DeltaMessage | None:
        content, name, arguments = calls[index].push(text)
        if final:
            held, more = calls[index].finish()
            content, arguments = content + held, arguments + more
        if content:  # "auto" answered in text
            return DeltaMessage(content=content)
        if name is not None:
            function = FunctionCallDelta(name=name, arguments=arguments)
            delta = ToolCallDelta(index=0, id=call_id(), type="function", function=function)
        elif arguments:
            delta = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=arguments))
        else:
            return None
        return DeltaMessage(tool_calls=[delta])

    def chunk(index: int, delta: DeltaMessage, finish: str | None = None) -> str:
        logprobs = None
        if pending[index]:
            logprobs = ChoiceLogprobs.of(pending[index])
            pending[index] = []
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)  # type: ignore[arg-type]
        body = ChatCompletionChunk(
            id=completion_id, created=created, model=service.model_name, choices=[choice]
        )
        return sse(body.model_dump_json())

    def render(index: int, event: Event) -> str:
        nonlocal usage
        if isinstance(event, ErrorEvent):
            return sse_error(event)
        if event.logprobs is not None:
            pending[index].append(event.logprobs)
        final = isinstance(event, FinishEvent)
        if calls:
            delta = call_delta(index, event.text, final)
        else:
            delta = DeltaMessage(content=event.text) if event.text else None
        text = chunk(index, delta) if delta is not None else ""
        if isinstance(event, FinishEvent):
            usage += event.usage
            finish = "tool_calls" if calls and calls[index].complete else event.finish_reason
            text += chunk(index, DeltaMessage(), finish)
        return text

    try:
        yield "".join(
            chunk(index, DeltaMessage(role="assistant", content=None if forced else ""))
            for index in range(len(generations))
        )
        async for index, batch in merged_event_batches(generations):  # several events: one write
            text = "".join(render(index, event) for event in batch)
            if text:
                yield text
        if include_usage:
            last = ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=service.model_name,
                choices=[],
                usage=UsageInfo.of(usage),
            )
            yield sse(last.model_dump_json())
        yield sse("[DONE]")
    finally:
        for generation in generations:
            generation.cancel()
