"""Pre-training the toy world's LLM: a byte-level BPE tokenizer and a small GLM that must read
its answers out of media spans (stand-in vectors that state the media's content)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from xllm.model.recipes.pretrain import train_steps
from xllm.model.recipes.world import SPAN_TOKENS, Encoded, World, text_corpus

log = logging.getLogger("xllm.recipe")


def build_tokenizer(seed: int, vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from xllm.model.prompt import GLM4_CHAT_TEMPLATE
    from xllm.model.tiny import SPECIAL_TOKENS, TAG_TOKENS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TAG_TOKENS + SPAN_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = text_corpus(random.Random(seed), 2000)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:] + TAG_TOKENS + SPAN_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = GLM4_CHAT_TEMPLATE
    return fast


@dataclass
class LMSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_len: int = 2048


def build_glm(tokenizer, size: LMSize):
    from xllm.model.tiny import glm_for_tokenizer

    return glm_for_tokenizer(
        tokenizer,
        hidden=size.hidden,
        intermediate=size.intermediate,
        layers=size.layers,
        heads=size.heads,
        kv_heads=size.kv_heads,
        max_len=size.max_len,
    )


def lm_batch(
    model, world: World, rows: list[Encoded], noise: float, rng: torch.Generator | None = None
):
    """(inputs_embeds, attention_mask, labels) with stand-in span vectors (+ Gaussian noise)."""
    embed = model.get_input_embeddings()
    length = max(len(r.ids) for r in rows)
    pad = model.config.pad_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    span = torch.zeros(len(rows), length, dtype=torch.bool)
    px = torch.zeros(len(rows), length)
    py = torch.zeros(len(rows), length)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        mask[i, :n] = 1
        target = torch.tensor(r.labels)
        labels[i, :n] = torch.where(target, ids[i, :n], torch.full_like(ids[i, :n], -100))
        span[i, :n] = torch.tensor(r.span)
        px[i, :n] = torch.tensor(r.px)
        py[i, :n] = torch.tensor(r.py)
    x = embed(ids)
    weight = embed.weight
    x = x + px[..., None] * weight[world.px_id] + py[..., None] * weight[world.py_id]
    if noise > 0:
        scale = weight.detach().std() * noise
        per_row = torch.rand(len(rows), 1, 1, generator=rng)  # 0..noise, per dialogue
        x = x + span[..., None] * torch.randn(x.shape, generator=rng) * scale * per_row
    return x, mask, labels


def lm_accuracy(model, world: World, rows: list[Encoded], batch: int = 64) -> dict[str, float]:
    """Teacher-forced exact match of every answer token (= greedy correctness), per kind."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            x, mask, labels = lm_batch(model, world, chunk, 0.0)
            logits = model(inputs_embeds=x, attention_mask=mask).logits
            pred = logits[:, :-1].argmax(-1)
            gold = labels[:, 1:]
            # Every end-of-turn token ends generation alike (<|endoftext|> or <|user|>).
            stops = torch.tensor(model.generation_config.eos_token_id)
            same_stop = torch.isin(pred, stops) & torch.isin(gold, stops)
            ok = ((pred == gold) | (gold == -100) | same_stop).all(-1)
            for r, good in zip(chunk, ok.tolist(), strict=True):
                hits.setdefault(r.kind, []).append(good)
    model.train()
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def pretrain_lm(
    tokenizer,
    *,
    queries: int,
    max_frames: int,
    size: LMSize,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    noise: float = 0.5,
    pool: int = 20000,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    init: str | None = None,
):
    """Train a GLM on toy-world dialogues whose answers must be read out of media spans.

    `init`: continue from a saved GLM (a fresh pool of dialogues)."""
    torch.manual_seed(seed)
    if init is not None:
        from transformers import GlmForCausalLM

        model = GlmForCausalLM.from_pretrained(init)
        seed += 1000
    else:
        model = build_glm(tokenizer, size)
    world = World(tokenizer, queries, max_frames)
    rng = random.Random(seed)
    t0 = time.time()
    rows = [world.encode(world.draw(rng)) for _ in range(pool)]
    log.info("LM corpus: %d dialogues in %.1fs", len(rows), time.time() - t0)
    test_rng = random.Random(seed + 10_000)
    test = [world.encode(world.draw(test_rng, kind)) for kind in world.KINDS for _ in range(60)]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()

    def loss_at(step: int) -> torch.Tensor:
        chunk = rng.sample(rows, batch_size)
        x, mask, labels = lm_batch(model, world, chunk, noise, gen)
        return model(inputs_embeds=x, attention_mask=mask, labels=labels).loss

    def after_step(step: int) -> None:
        if on_step:
            on_step(step)
        if (step + 1) % 250 == 0 and step + 1 < steps:
            log.info("LM step %d: copy test %s", step + 1, lm_accuracy(model, world, test[::4]))

    losses = train_steps(
        "pretrain LLM",
        opt,
        list(model.parameters()),
        steps=steps,
        lr=lr,
        warmup=min(200, steps // 10 + 1),
        loss_at=loss_at,
        after_step=after_step,
    )
    accuracy = lm_accuracy(model, world, test)
    log.info("LM copy test (answers read from the media spans): %s", accuracy)
    return model, {"final_loss": float(np.mean(losses[-50:])), "copy_test": accuracy}
