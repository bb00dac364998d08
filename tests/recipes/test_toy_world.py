"""The toy-world recipe: its pre-training data is right, and (slow) the recipe at a reduced size
trains interfaces that learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from xllm.model.recipes.heldout import names_exactly, says_all_of, scene_of, scene_question_kind
from xllm.model.recipes.pretrain import edit_distance
from xllm.model.recipes.pretrain_llm import build_tokenizer
from xllm.model.recipes.pretrain_speech import (
    ACCENTS,
    HELDOUT_SPEEDS,
    HELDOUT_VARIANTS,
    TRAIN_SPEEDS,
    TRAIN_VARIANTS,
)
from xllm.model.recipes.world import World
from xllm.model.train import toy


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(0)


def test_world_words_are_single_tokens(tokenizer) -> None:
    world = World(tokenizer, queries=4)
    assert len(set(world.word.values())) == len(toy.COLORS) + len(toy.SHAPES)


@pytest.mark.parametrize("kind", list(World.KINDS))
def test_dialogues_put_the_answer_in_the_span(tokenizer, kind: str) -> None:
    """Every answer word about the media is stated inside a media span (the copy task)."""
    world = World(tokenizer, queries=4)
    rng = random.Random(kind)
    for _ in range(20):
        encoded = world.encode(world.draw(rng, kind))
        answer = [i for i, label in zip(encoded.ids, encoded.labels, strict=True) if label]
        span = {i for i, inside in zip(encoded.ids, encoded.span, strict=True) if inside}
        text = tokenizer.decode(answer, skip_special_tokens=True).lower()
        for word in text.replace(".", " ").split():
            if word in toy.COLORS or word in toy.SHAPES:
                assert world.word[word] in span, (kind, text)
        if kind in ("direction", "spoken_video"):  # the direction is only in the coordinates
            assert any(x != 0 for x in encoded.px) or any(y != 0 for y in encoded.py)
        assert answer[-1] in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>"))


def test_prompts_tokenize_like_the_server(tokenizer) -> None:
    """The pre-training prompt is xllm's own layout: tags, placeholders, answer tokens."""
    world = World(tokenizer, queries=4)
    dialogue = world.draw(random.Random(1), "color")
    encoded = world.encode(dialogue)
    text = tokenizer.decode(encoded.ids)
    assert text.startswith("[gMASK]<sop><|user|>\n<image>")
    assert "</image>" in text and text.endswith("<|endoftext|>")


def test_voices_hold_out_variants_and_speeds_but_no_accent() -> None:
    assert set(ACCENTS) == set(toy.VOICES)
    assert not set(TRAIN_VARIANTS) & set(HELDOUT_VARIANTS)
    assert set(TRAIN_VARIANTS) | set(HELDOUT_VARIANTS) == set(toy.VARIANTS)
    assert not set(TRAIN_SPEEDS) & set(HELDOUT_SPEEDS)
    assert min(TRAIN_SPEEDS) == 120 and max(TRAIN_SPEEDS) == 200


def test_heldout_scoring() -> None:
    assert names_exactly("A red circle.", {"color": "red", "shape": "circle"})
    assert not names_exactly("A red or blue circle.", {"color": "red", "shape": "circle"})
    assert not names_exactly("Red.", {"color": "red", "shape": "circle"})
    assert scene_of("A blue star moving left.") == {
        "color": "blue",
        "shape": "star",
        "direction": "left",
    }
    assert edit_distance(["a", "red", "circle"], ["a", "red", "square"]) == 1
    assert scene_question_kind("<image> How many red shapes are there?") == "count"
    assert scene_question_kind("Is the brown square small or large?") == "size"
    assert scene_question_kind("Describe the image.") is None
    assert says_all_of("There are 3.", "Three.") and says_all_of("three", "Three.")
    assert says_all_of("It is in the top left corner.", "In the top left corner.")
    assert not says_all_of("In the top right corner.", "In the top left corner.")
    assert not says_all_of("One.", "Three.")


@pytest.mark.slow
def test_recipe_small_scale_interfaces_learn(tmp_path: Path) -> None:
    """The whole recipe at --scale small; the image interface must beat chance by far."""
    from xllm.model.recipes.heldout import LocalClient, evaluate
    from xllm.model.recipes.toy_world import main

    out = tmp_path / "recipe"
    assert main(["--out", str(out), "--scale", "small"]) == 0
    model = out / "model"
    assert (model / "xllm.json").is_file() and (model / "interfaces.safetensors").is_file()
    record = json.loads((out / "recipe.json").read_text())
    for phase in ("llm", "vision", "speech", "chain-vision", "chain-speech", "stage3", "export"):
        assert phase in record["phases"], phase
    # The LLM reads its context (copy test) and the vision tower sees colours.
    assert record["phases"]["llm"]["copy_test"]["color"] > 0.5
    assert record["phases"]["vision"]["color"] > 0.5
    # Held-out questions on the recipe's validation images; chance on colour is 1/6.
    data = out / "data"
    for name in ("image", "video", "speech", "mixed"):
        (data / f"{name}_train.jsonl").rename(data / f"{name}_train.jsonl.bak")
        (data / f"{name}_val.jsonl").rename(data / f"{name}_train.jsonl")
    result = evaluate(LocalClient(model), data, None, n=16)
    assert result["image_color"] > 0.4, result
