"""Splicing media into a batched multi-turn conversation (xllm.model.prompt)."""

from __future__ import annotations

import pytest
import torch

from xllm.model.config import Tags
from xllm.model.prompt import (
    MediaRef,
    MediaSegment,
    Message,
    PromptError,
    bind_media,
    build_layout,
    collate,
    embed_layout,
)

TURNS = [
    ("system", "sys"),
    ("user", "look <image> and <image>"),
    ("assistant", "ok fine"),
    ("user", "now <audio> please"),
]
KINDS = ["image", "audio", "image", "video"]
# Segment lengths per media item; the video (item 3) has a sound track: two segments.
SEGMENTS = [
    [MediaSegment("image", 3)],
    [MediaSegment("audio", 4)],
    [MediaSegment("image", 2)],
    [MediaSegment("video", 5), MediaSegment("audio", 2)],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model.tokenizer


@pytest.fixture(scope="module")
def embed_tokens(tiny_model):
    return tiny_model.llm.get_input_embeddings()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bind_media_in_order_per_kind_and_unplaced_to_last_user_turn() -> None:
    messages = bind_media(TURNS, KINDS)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].parts == ["sys"]
    # The two <image> placeholders take image items 0 and 2 (skipping the audio item 1).
    assert messages[1].parts == ["look ", MediaRef("image", 0), " and ", MediaRef("image", 2)]
    assert messages[2].parts == ["ok fine"]
    # The video has no placeholder: it goes to the last user turn, before its text.
    assert messages[3].parts == [MediaRef("video", 3), "now ", MediaRef("audio", 1), " please"]


def test_bind_media_without_placeholders_keeps_request_order() -> None:
    turns = [("user", "first"), ("assistant", "a"), ("user", "second")]
    messages = bind_media(turns, ["audio", "image", "video", "image"])
    assert messages[0].parts == ["first"]
    assert messages[2].parts == [
        MediaRef("audio", 0),
        MediaRef("image", 1),
        MediaRef("video", 2),
        MediaRef("image", 3),
        "second",
    ]


@pytest.mark.parametrize(
    ("turns", "kinds", "words"),
    [
        ([("user", "<image> <image>")], ["image"], ["2 <image>", "1 image"]),
        ([("user", "<image>")], ["image", "image"], ["1 <image>", "2 image"]),
        ([("user", "<audio>")], [], ["1 <audio>", "0 audio"]),
        ([("user", "hi"), ("assistant", "<video>")], ["video", "video"], ["<video>", "2 video"]),
        ([("system", "x")], ["image"], ["no user turn"]),
        ([("robot", "x")], [], ["unknown role 'robot'"]),
        ([], [], ["empty"]),
    ],
)
def test_bind_media_mismatches_raise(turns, kinds, words) -> None:
    with pytest.raises(PromptError) as info:
        bind_media(turns, kinds)
    for word in words:
        assert word in str(info.value)


def test_spans_are_between_their_tags(tokenizer) -> None:
    layout = build_layout(tokenizer, bind_media(TURNS, KINDS), SEGMENTS, Tags(), pad_id=1)
    tags = Tags()
    # Spans in prompt order: image 0, image 2, the video's frames then its audio, audio 1.
    assert [(s[1], s[2], s[3]) for s in layout.spans] == [
        (3, 0, 0),
        (2, 2, 0),
        (5, 3, 0),
        (2, 3, 1),
        (4, 1, 0),
    ]
    for start, length, index, segment in layout.spans:
        kind = SEGMENTS[index][segment].kind
        open_ids, close_ids = ids(tokenizer, tags.of(kind)[0]), ids(tokenizer, tags.of(kind)[1])
        assert layout.token_ids[start - len(open_ids) : start] == open_ids
        assert layout.token_ids[start : start + length] == [1] * length
        assert layout.token_ids[start + length : start + length + len(close_ids)] == close_ids
    # Outside the spans, the text is the chat template with empty tagged runs.
    in_span = {p for s, n, _, _ in layout.spans for p in range(s, s + n)}
    text_ids = [t for p, t in enumerate(layout.token_ids) if p not in in_span]
    assert tokenizer.decode(text_ids) == (
        "[gMASK]<sop><|system|>\nsys<|user|>\nlook <image></image> and <image></image>"
        "<|assistant|>\nok fine<|user|>\n<video></video><audio></audio>now <audio></audio> "
        "please<|assistant|>"
    )
    assert not any(layout.labels_mask)  # nothing is a target in generation mode
    assert len(layout.labels_mask) == len(layout)


def test_span_count_and_missing_media(tokenizer) -> None:
    with pytest.raises(PromptError, match="media item 3"):
        build_layout(tokenizer, bind_media(TURNS, KINDS), SEGMENTS[:3], Tags())


def test_embed_layout_puts_media_exactly_at_the_spans(tokenizer, embed_tokens) -> None:
    layout = build_layout(tokenizer, bind_media(TURNS, KINDS), SEGMENTS, Tags())
    hidden = embed_tokens.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    media = [
        [torch.randn(seg.length, hidden, generator=gen, requires_grad=True) for seg in item]
        for item in SEGMENTS
    ]
    embeds = embed_layout(embed_tokens, layout, media)
    assert embeds.shape == (len(layout), hidden)
    covered = torch.zeros(len(layout), dtype=torch.bool)
    for start, length, index, segment in layout.spans:
        torch.testing.assert_close(embeds[start : start + length], media[index][segment])
        covered[start : start + length] = True
    text = embed_tokens(torch.tensor(layout.token_ids))
    torch.testing.assert_close(embeds[~covered], text[~covered].detach())
    # Gradients reach the media vectors (the trainable interfaces' outputs).
    embeds.sum().backward()
    assert all(t.grad is not None and (t.grad == 1).all() for item in media for t in item)


def test_embed_layout_rejects_wrong_media_lengths(tokenizer, embed_tokens) -> None:
    layout = build_layout(tokenizer, bind_media(TURNS, KINDS), SEGMENTS, Tags())
    hidden = embed_tokens.weight.shape[1]
    media = [[torch.zeros(seg.length, hidden) for seg in item] for item in SEGMENTS]
    media[1][0] = torch.zeros(5, hidden)
    with pytest.raises(PromptError, match="media item 1 has 5 vectors"):
        embed_layout(embed_tokens, layout, media)


def conversations() -> list[tuple[list[Message], list[list[MediaSegment]]]]:
    first = bind_media([*TURNS, ("assistant", "the end")], KINDS)
    second = bind_media([("user", "<audio> what?"), ("assistant", "a sound")], ["audio"])
    return [(first, SEGMENTS), (second, [[MediaSegment("audio", 6)]])]


def test_labels_mark_only_answers_and_turn_ends(tokenizer) -> None:
    first, segments = conversations()[0]
    layout = build_layout(tokenizer, first, segments, Tags(), add_generation_prompt=False)
    labelled = [t for t, m in zip(layout.token_ids, layout.labels_mask, strict=True) if m]
    # "ok fine" ends with the next turn's role token, "the end" with EOS.
    assert labelled == ids(tokenizer, "ok fine") + ids(tokenizer, "<|user|>") + ids(
        tokenizer, "the end"
    ) + [tokenizer.eos_token_id]
    assert layout.token_ids[-1] == tokenizer.eos_token_id
    # The labelled tokens are contiguous runs right after "<|assistant|>\n".
    runs, pos = [], 0
    while pos < len(layout):
        if layout.labels_mask[pos]:
            end = pos
            while end < len(layout) and layout.labels_mask[end]:
                end += 1
            runs.append((pos, end))
            pos = end
        else:
            pos += 1
    assert len(runs) == 2
    header = ids(tokenizer, "<|assistant|>\n")
    for start, _ in runs:
        assert layout.token_ids[start - len(header) : start] == header
    # Media positions are never targets.
    for start, length, _, _ in layout.spans:
        assert not any(layout.labels_mask[start : start + length])


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_masks_positions_and_labels(tokenizer, embed_tokens, side: str) -> None:
    hidden = embed_tokens.weight.shape[1]
    layouts, embeds = [], []
    for messages, segments in conversations():
        layout = build_layout(tokenizer, messages, segments, Tags(), add_generation_prompt=False)
        media = [[torch.randn(s.length, hidden) for s in item] for item in segments]
        layouts.append(layout)
        embeds.append(embed_layout(embed_tokens, layout, media))
    n = [len(layout) for layout in layouts]
    assert n[0] != n[1]
    batch = collate(embeds, layouts, padding_side=side)
    length = max(n)
    assert batch.inputs_embeds.shape == (2, length, hidden)
    for row, (layout, emb) in enumerate(zip(layouts, embeds, strict=True)):
        real = slice(length - n[row], length) if side == "left" else slice(0, n[row])
        pad = slice(0, length - n[row]) if side == "left" else slice(n[row], length)
        assert batch.attention_mask[row, real].eq(1).all()
        assert batch.attention_mask[row, pad].eq(0).all()
        assert batch.position_ids[row, real].tolist() == list(range(n[row]))
        torch.testing.assert_close(batch.inputs_embeds[row, real], emb)
        assert batch.inputs_embeds[row, pad].eq(0).all()
        ids_t = torch.tensor(layout.token_ids)
        mask_t = torch.tensor(layout.labels_mask)
        assert batch.labels[row, real][mask_t].tolist() == ids_t[mask_t].tolist()
        assert batch.labels[row, real][~mask_t].eq(-100).all()
        assert batch.labels[row, pad].eq(-100).all()
    assert collate(embeds).labels is None


@torch.no_grad()
def test_left_padded_batch_gives_the_unpadded_logits(tiny_model) -> None:
    """Masks and positions are right: each row's last logits equal its own unbatched run."""
    llm = tiny_model.llm
    embed_tokens = llm.get_input_embeddings()
    hidden = embed_tokens.weight.shape[1]
    gen = torch.Generator().manual_seed(1)
    embeds = []
    for messages, segments in conversations():
        layout = build_layout(tiny_model.tokenizer, messages, segments, Tags())
        media = [[torch.randn(s.length, hidden, generator=gen) for s in item] for item in segments]
        embeds.append(embed_layout(embed_tokens, layout, media))
    batch = collate(embeds, padding_side="left")
    logits = llm(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits[:, -1]
    for row, emb in enumerate(embeds):
        alone = llm(inputs_embeds=emb[None]).logits[0, -1]
        torch.testing.assert_close(logits[row], alone, atol=1e-4, rtol=1e-4)
