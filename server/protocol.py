"""Pydantic models of the HTTP API: `/chat` replies and the OpenAI Chat Completions and
(legacy) Completions schemas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xllm.model.sampling import (
    CHOICES,
    COMPLETION_LOGPROBS,
    MAX_TOKENS,
    MIN_TOKENS,
    OPENAI_TEMPERATURE,
    PENALTY,
    REPETITION_PENALTY,
    TOP_K,
    TOP_LOGPROBS,
    TOP_P,
)

if TYPE_CHECKING:
    from xllm.server.files import StoredFile

# OpenAI's presence_penalty / frequency_penalty field, range from the sampler's own constant
Penalty = Annotated[float | None, Field(**PENALTY.bounds)]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class PromptTokensDetails(BaseModel):
    """Where the prompt's positions went: OpenAI's `cached_tokens` and `audio_tokens`, and
    xllm's `image_tokens` / `video_tokens` (positions filled by media embeddings, by kind)."""

    cached_tokens: int = Field(0, description="positions whose K/V were reused, not computed")
    audio_tokens: int = Field(0, description="speech embeddings (a video's sound track too)")
    image_tokens: int = Field(0, description="image embeddings (xllm)")
    video_tokens: int = Field(0, description="video frame embeddings (xllm)")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, usage: Any) -> UsageInfo:
        """From the engine's Usage (token counts, cached positions, media positions by kind)."""
        media = usage.media_tokens
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=usage.cached_tokens,
                audio_tokens=media.get("audio", 0),
                image_tokens=media.get("image", 0),
                video_tokens=media.get("video", 0),
            ),
        )


# --- POST /chat ---
class ChatTurn(BaseModel):
    """One entry of the `messages` form field (a JSON array of these)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatReply(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: UsageInfo


class ChatStreamEvent(BaseModel):
    """One SSE `data:` event of a streamed /chat reply (the last carries finish_reason + usage)."""

    id: str
    delta: str
    finish_reason: Literal["stop", "length"] | None = None
    usage: UsageInfo | None = None


# --- POST /v1/chat/completions (OpenAI) ---
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class InputAudio(BaseModel):
    data: str  # base64
    format: Literal["wav", "mp3", "flac", "ogg"]


class VideoURL(BaseModel):
    url: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


class FileRef(BaseModel):
    file_id: str = Field(description="a media handle from POST /v1/files")


class FilePart(BaseModel):
    """A media handle (image, audio or video, as its bytes are), OpenAI's file content part."""

    type: Literal["file"]
    file: FileRef


ContentPart = TextPart | ImagePart | AudioPart | VideoPart | FilePart


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`json_object`: any JSON object; `json_schema`: JSON valid under its schema (both
    enforced by grammar-constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked by name in serving

    model: str | None = None
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, **MAX_TOKENS.bounds)
    max_completion_tokens: int | None = Field(None, **MAX_TOKENS.bounds)
    temperature: float | None = Field(None, **OPENAI_TEMPERATURE.bounds)
    top_p: float | None = Field(None, **TOP_P.bounds)
    n: int | None = Field(
        None, description="choices from one prompt (prefilled once)", **CHOICES.bounds
    )
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, **TOP_LOGPROBS.bounds)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, **TOP_K.bounds)
    min_tokens: int | None = Field(None, **MIN_TOKENS.bounds)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(None, **REPETITION_PENALTY.bounds)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


def token_text(token: bytes) -> str:
    """A token's bytes as text; a token that is not whole UTF-8 (part of a character) as
    `bytes:\\xe2\\x80` (OpenAI's form), so that distinct tokens never read the same."""
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    """One generated token. Logprobs are those of the distribution sampled from after the
    penalties and temperature (the model's own at temperature 0), before top-k / top-p."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, entry: Any) -> TokenLogprob:
        """From the engine's TokenLogprobs (token bytes, logprob, top (bytes, logprob) pairs)."""
        return cls(
            token=token_text(entry.token),
            logprob=entry.logprob,
            bytes=list(entry.token),
            top_logprobs=[
                TopLogprob(token=token_text(t), logprob=lp, bytes=list(t)) for t, lp in entry.top
            ],
        )


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None

    @classmethod
    def of(cls, entries: list[Any]) -> ChoiceLogprobs:
        return cls(content=[TokenLogprob.of(e) for e in entries])


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call: the first delta has its id, type and name, the next ones more of
    its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None  # the entries of the tokens in this delta


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


# --- POST /v1/completions (OpenAI's legacy Completions) ---
class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked by name in serving

    model: str | None = None
    prompt: str | list[str] = Field(
        description="raw text (no chat template); a list: a choice each"
    )
    max_tokens: int | None = Field(16, **MAX_TOKENS.bounds)  # OpenAI's default
    temperature: float | None = Field(None, **OPENAI_TEMPERATURE.bounds)
    top_p: float | None = Field(None, **TOP_P.bounds)
    n: int | None = Field(None, description="choices per prompt (prefilled once)", **CHOICES.bounds)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, **COMPLETION_LOGPROBS.bounds)
    echo: bool = False
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, **TOP_K.bounds)
    min_tokens: int | None = Field(None, **MIN_TOKENS.bounds)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(None, **REPETITION_PENALTY.bounds)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format: per token its text, logprob, the most likely alternatives
    ({text: logprob}) and its character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first token of an echoed prompt
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list[Any], before: bytes = b"") -> CompletionLogprobs:
        """From the engine's TokenLogprobs. A token's text_offset counts the whole characters
        of the tokens before it (`before`: the bytes of earlier tokens of the choice, for a
        stream's later chunks)."""
        offsets, seen = [], before
        for entry in entries:
            offsets.append(len(seen.decode("utf-8", errors="ignore")))
            seen += entry.token
        return cls(
            tokens=[token_text(e.token) for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[
                None if e.logprob is None else {token_text(t): lp for t, lp in e.top}
                for e in entries
            ],
            text_offset=offsets,
        )


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None  # None until a stream's choice ends
    logprobs: CompletionLogprobs | None = None


class TextCompletion(BaseModel):
    """A completion, or (streaming) one chunk of it: same object, text deltas in choices."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# --- /v1/files (OpenAI's Files API: media handles) ---
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # decoded and preprocessed when created

    @classmethod
    def of(cls, stored: StoredFile) -> FileObject:
        return cls(
            id=stored.id,
            bytes=stored.size,
            created_at=stored.created_at,
            expires_at=stored.expires_at,
            filename=stored.filename,
            purpose=stored.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "xllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- POST /v1/audio/transcriptions (OpenAI) ---
TranscriptionFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]


class TranscriptionTokenDetails(BaseModel):
    audio_tokens: int
    text_tokens: int


class TranscriptionUsage(BaseModel):
    """OpenAI's token usage of a transcription: all its segments' requests together."""

    type: Literal["tokens"] = "tokens"
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_token_details: TranscriptionTokenDetails

    @classmethod
    def of(cls, usage: Any) -> TranscriptionUsage:
        """From the engine's Usage."""
        audio = usage.media_tokens.get("audio", 0)
        return cls(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            input_token_details=TranscriptionTokenDetails(
                audio_tokens=audio, text_tokens=usage.prompt_tokens - audio
            ),
        )


class Transcription(BaseModel):
    text: str
    usage: TranscriptionUsage


class TranscriptionSegment(BaseModel):
    id: int
    seek: int = Field(description="the segment's start in 10 ms frames (Whisper's unit)")
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str = Field(description="as given ('unknown' if not): the model is not asked it")
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: DurationUsage


class TranscriptTextDelta(BaseModel):
    """A streamed transcription's SSE event: more text."""

    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTextDone(BaseModel):
    """A streamed transcription's last SSE event: the whole text."""

    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: TranscriptionUsage
