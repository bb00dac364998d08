"""Prompt assembly: a chat with media becomes token ids plus the spans where media embeddings go.

The conversation is rendered with the tokenizer's own chat template (GLM-4:
`[gMASK]<sop><|user|>\\n...<|assistant|>`). Every media item is rendered as a sentinel first; the
text between sentinels is tokenized, and each sentinel becomes `<tag>` + N embedding positions +
`</tag>` (X-LLM's "foreign language" spans). Tags are tokenized on their own, so `</image>` is
always the same ids whatever text surrounds it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from xllm.model.config import MODALITIES, Modality, Tags

# observation: a tool's result (GLM-4's role for it)
ROLES = ("system", "user", "assistant", "observation")
# What speech recognition asks: the instruction of training's transcript rows, evaluation's asr
# task and the server's /v1/audio/transcriptions (the audio goes before it).
ASR_INSTRUCTION = "Transcribe the audio."
PLACEHOLDER = re.compile(r"<(image|audio|video)>")
# Sentinels never produced by users: rendered into the template text, then split on.
_SENTINEL = "\x00XLLM{}\x00"
_SENTINEL_RE = re.compile("\x00XLLM(\\d+|A|/A)\x00")

# GLM-4's template, for tokenizers that ship none.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class PromptError(ValueError):
    """A malformed conversation (the caller's mistake)."""


@dataclass(frozen=True)
class MediaRef:
    kind: Modality
    index: int  # position in the request's list of media items (all kinds together)


Part = str | MediaRef


@dataclass
class Message:
    role: str
    parts: list[Part]


@dataclass
class MediaSegment:
    """One tagged run of embeddings; a video with sound gives a video and an audio segment."""

    kind: Modality
    length: int


@dataclass
class PromptLayout:
    """token_ids (L,) with media positions holding `pad_id`; spans say which media fills them."""

    token_ids: list[int]
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (start, length, media index, segment index within that media item)
    labels_mask: list[bool] = field(
        default_factory=list
    )  # True where the token is a training target

    def __len__(self) -> int:
        return len(self.token_ids)


def split_placeholders(text: str) -> list[tuple[str, Modality | None]]:
    """'a <image> b' -> [('a ', None), ('', 'image'), (' b', None)] (text, or a placeholder)."""
    out: list[tuple[str, Modality | None]] = []
    pos = 0
    for match in PLACEHOLDER.finditer(text):
        out.append((text[pos : match.start()], None))
        out.append(("", match.group(1)))  # type: ignore[arg-type]
        pos = match.end()
    out.append((text[pos:], None))
    return out


def bind_media(turns: Sequence[tuple[str, str]], media_kinds: Sequence[Modality]) -> list[Message]:
    """Bind a request's media to its conversation.

    `turns` are (role, text) pairs; `media_kinds[i]` is the kind of the request's i-th media item.
    `<image>`, `<audio>`, `<video>` placeholders bind, in order, to the items of that kind. A kind
    with no placeholder at all has its items attached to the last user turn, before its text.
    Any other count mismatch is an error.
    """
    if not turns:
        raise PromptError("the conversation is empty")
    for role, _ in turns:
        if role not in ROLES:
            raise PromptError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
    by_kind: dict[str, list[int]] = {k: [] for k in MODALITIES}
    for index, kind in enumerate(media_kinds):
        by_kind[kind].append(index)
    placeholders = {k: 0 for k in MODALITIES}
    for _, text in turns:
        for match in PLACEHOLDER.finditer(text):
            placeholders[match.group(1)] += 1
    for kind in MODALITIES:
        have, want = len(by_kind[kind]), placeholders[kind]
        if want and want != have:
            raise PromptError(
                f"the messages have {want} <{kind}> placeholder(s) but {have} {kind} file(s) "
                "were given"
            )
    last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
    unplaced = [i for kind in MODALITIES if not placeholders[kind] for i in by_kind[kind]]
    if unplaced and last_user is None:
        raise PromptError("media was given but the conversation has no user turn to attach it to")

    cursor = {k: 0 for k in MODALITIES}
    messages = []
    for turn_index, (role, text) in enumerate(turns):
        parts: list[Part] = []
        if turn_index == last_user:
            parts += [MediaRef(media_kinds[i], i) for i in sorted(unplaced)]
        for piece, kind in split_placeholders(text):
            if kind is None:
                if piece:
                    parts.append(piece)
            else:
                parts.append(MediaRef(kind, by_kind[kind][cursor[kind]]))
                cursor[kind] += 1
        messages.append(Message(role, parts))
    return messages


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GLM4_CHAT_TEMPLATE


def renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """The tokenizer's chat template lays out tool definitions (it reads `tools`), as
    GLM-4's does; GLM4_CHAT_TEMPLATE does not."""
    ensure_chat_template(tokenizer)
    return re.search(r"\btools\b", str(tokenizer.chat_template)) is not None


def build_layout(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    media_segments: Sequence[Sequence[MediaSegment]],
    tags: Tags,
    *,
    add_generation_prompt: bool = True,
    pad_id: int | None = None,
    tools: Sequence[dict] | None = None,
) -> PromptLayout:
    """Token ids and media spans for a conversation.

    media_segments[i] are the tagged embedding runs of media item i (known after encoding).
    With add_generation_prompt=False (training), assistant contents and the token that ends each
    of them (the next role token, or EOS at the end) are marked in `labels_mask`. `tools`
    (OpenAI's function definitions) go to a template that renders them (`renders_tools`).
    """
    ensure_chat_template(tokenizer)
    rendered: list[dict[str, str]] = []
    for message in messages:
        text = ""
        for part in message.parts:
            text += part if isinstance(part, str) else _SENTINEL.format(part.index)
        if message.role == "assistant" and not add_generation_prompt:
            text = _SENTINEL.format("A") + text + _SENTINEL.format("/A")
        rendered.append({"role": message.role, "content": text})
    extra = {"tools": list(tools)} if tools else {}
    prompt = tokenizer.apply_chat_template(
        rendered, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    layout = PromptLayout(token_ids=[])
    in_answer = False
    label_next = False

    def add_tokens(ids: list[int], label: bool) -> None:
        nonlocal label_next
        if label_next and ids:
            # The token after an answer (next role token / EOS) ends the turn: learn to emit it.
            layout.token_ids.append(ids[0])
            layout.labels_mask.append(True)
            ids = ids[1:]
            label_next = False
        layout.token_ids.extend(ids)
        layout.labels_mask.extend([label] * len(ids))

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    pos = 0
    for match in _SENTINEL_RE.finditer(prompt):
        add_tokens(tokenize(prompt[pos : match.start()]), in_answer)
        pos = match.end()
        marker = match.group(1)
        if marker == "A":
            in_answer = True
        elif marker == "/A":
            in_answer = False
            label_next = True
        else:
            index = int(marker)
            if index >= len(media_segments):
                raise PromptError(f"media item {index} has no embeddings")
            for seg_index, segment in enumerate(media_segments[index]):
                open_tag, close_tag = tags.of(segment.kind)
                add_tokens(tokenize(open_tag), False)
                start = len(layout.token_ids)
                layout.spans.append((start, segment.length, index, seg_index))
                add_tokens([pad_id] * segment.length, False)
                add_tokens(tokenize(close_tag), False)
    add_tokens(tokenize(prompt[pos:]), in_answer)
    if label_next:
        eos = tokenizer.eos_token_id
        add_tokens([eos if eos is not None else pad_id], True)
    return layout


def embed_layout(
    embed_tokens: torch.nn.Module,
    layout: PromptLayout,
    media_embeds: Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """(L, H) input embeddings: token embeddings with each media span replaced by its vectors.

    media_embeds[i][j] is segment j of media item i, shaped (length, H). Built by concatenation so
    gradients flow into the interfaces during training.
    """
    weight = embed_tokens.weight
    ids = torch.tensor(layout.token_ids, device=weight.device)
    text = embed_tokens(ids)  # (L, H)
    pieces = []
    pos = 0
    for start, length, index, segment in sorted(layout.spans):
        media = media_embeds[index][segment]
        if media.shape[0] != length:
            raise PromptError(
                f"media item {index} has {media.shape[0]} vectors, the layout {length}"
            )
        pieces += [text[pos:start], media.to(text.dtype)]
        pos = start + length
    pieces.append(text[pos:])
    return torch.cat(pieces, dim=0)


@dataclass
class Batch:
    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    position_ids: torch.Tensor  # (B, L) 0.. along real tokens
    labels: torch.Tensor | None = None  # (B, L) -100 where not a target


def collate(
    embeds: Sequence[torch.Tensor],
    layouts: Sequence[PromptLayout] | None = None,
    *,
    padding_side: str = "right",
) -> Batch:
    """Pad sequences of embeddings (L_i, H) to a batch with masks and positions.

    Left padding ends every row on its last token (generation; training, where answers end the
    rows). With layouts given, labels hold the next-token targets (-100 elsewhere).
    """
    length = max(e.shape[0] for e in embeds)
    hidden = embeds[0].shape[-1]
    batch = len(embeds)
    inputs = embeds[0].new_zeros(batch, length, hidden)
    mask = torch.zeros(batch, length, dtype=torch.long, device=embeds[0].device)
    labels = torch.full((batch, length), -100, dtype=torch.long, device=embeds[0].device)
    for row, emb in enumerate(embeds):
        n = emb.shape[0]
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        inputs[row, span] = emb
        mask[row, span] = 1
        if layouts is not None:
            ids = torch.tensor(layouts[row].token_ids, device=mask.device)
            target = torch.tensor(layouts[row].labels_mask, device=mask.device)
            labels[row, span] = torch.where(target, ids, torch.full_like(ids, -100))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(inputs, mask, positions, labels if layouts is not None else None)
