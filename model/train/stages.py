"""The three X-LLM training stages: which rows they use, which weights train, and their losses.

Stage 1 trains an interface without the LLM:
    image:  Q-Former + image queries with BLIP-2's stage-1 objectives, image-text contrastive
            (ITC) and image-grounded text generation (ITG), against a small training-only text
            tower (`ImageTextHeads`, saved apart from the interfaces);
    speech: C-Former (projection included) with the CIF quantity loss plus token cross-entropy:
            CIF fires exactly one vector per transcript token (LLM tokenizer), read back as the
            nearest entry of the frozen LLM's embedding table (`SpeechStage1`).
Stage 2 aligns one interface with the frozen LLM (LM cross-entropy on answer tokens only):
    image: Q-Former + image queries + projection; video: its own Q-Former + video queries +
    frame positions + projection (all initialised from the image interface; X-LLM shares the
    image Q-Former and trains only queries and projection); speech: C-Former + projection.
Stage 3 trains on mixed instructions; by default only the projections train (X-LLM's choice).

Objectives are `nn.Module`s that own (register) only the interfaces and heads, never the frozen
encoders or LLM, so DDP sees exactly the trainable side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from xllm.model.config import Modality
from xllm.model.prompt import ASR_INSTRUCTION, Batch, Message, bind_media, collate
from xllm.model.train.config import TrainConfig
from xllm.model.train.data import Example, Sample
from xllm.model.x2l.cformer import CFormer, quantity_loss
from xllm.model.x2l.transcript_prior import piece_embeddings
from xllm.model.xllm import XLLM

# The media kinds each --modality trains on.
STAGE_KINDS: dict[str, frozenset[str]] = {
    "image": frozenset({"image"}),
    "speech": frozenset({"audio"}),
    "video": frozenset({"video"}),
    "all": frozenset({"image", "audio", "video"}),
}
# Instructions that turn a `text` row into a conversation (the text is the answer).
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "image": ("Describe the image.", "What is in the image?", "What do you see?"),
    "audio": (ASR_INSTRUCTION,),
    "video": ("Describe the video.", "What happens in the video?"),
}


class StageError(ValueError):
    """The stage cannot run with this model or these settings (the user's to fix)."""


def row_filter(config: TrainConfig) -> Callable[[Example], str | None]:
    """A `read_manifest` accept function: the reason a row does not fit the stage, or None."""
    allowed = STAGE_KINDS[config.modality]

    def accept(example: Example) -> str | None:
        if not set(example.kinds) <= allowed:
            return f"media other than {config.modality}"
        if config.stage == 1 and example.text is None:
            return "no text for stage 1"
        if config.stage == 1 and len(example.media) != 1:
            return "stage 1 takes one media item per row"
        return None

    return accept


def instruction_turns(example: Example) -> tuple[tuple[str, str], ...]:
    """The row's conversation; a `text` row becomes instruction -> text (media attached first)."""
    if example.turns is not None:
        return example.turns
    kind = example.kinds[0]
    choices = INSTRUCTIONS[kind]
    # A fixed choice per row (by its manifest line), so every run and rank sees the same data.
    instruction = choices[sum(map(ord, example.source)) % len(choices)]
    assert example.text is not None
    return (("user", instruction), ("assistant", example.text))


def messages_for(example: Example) -> list[Message]:
    return bind_media(instruction_turns(example), example.kinds)


# --- which weights train ------------------------------------------------------------------


def default_trainable(config: TrainConfig, model: XLLM) -> list[str]:
    """Parameter-name prefixes (in `model.interfaces()` naming) that train by default."""
    if config.stage == 1:
        if config.modality == "image":
            return ["image_interface.qformer", "image_interface.query_tokens"]
        return ["speech_interface"]
    if config.stage == 2:
        return {
            "image": ["image_interface"],
            "video": ["video_interface"],
            "speech": ["speech_interface"],
        }[config.modality]
    prefixes = ["image_interface.projection", "video_interface.projection"]
    if isinstance(model.speech_interface, CFormer):
        prefixes.append("speech_interface.projection")
    elif model.speech_interface is not None:
        prefixes.append("speech_interface.mlp")  # the frame-stacking projector is all projection
    return [p for p in prefixes if p.split(".")[0] in model.interfaces()]


def check_model(config: TrainConfig, model: XLLM) -> None:
    needed = {"image": "image_interface", "video": "video_interface", "speech": "speech_interface"}
    names = [needed[config.modality]] if config.modality in needed else []
    for name in names:
        if name not in model.interfaces():
            raise StageError(f"the model has no {name}: it cannot train {config.modality}")
    speech_stage1 = config.stage == 1 and config.modality == "speech"
    if speech_stage1 and not isinstance(model.speech_interface, CFormer):
        speech = model.config.speech_interface
        transcriber = model.speech.transcriber if model.speech is not None else None
        if speech is None or speech.stack_frames != 1 or transcriber is None:
            raise StageError(
                "speech stage 1 trains a C-Former (CIF), or a projector of one token per state "
                "of Whisper's decoder (speech_states 'decoder', stack_frames 1); this model's "
                "frame-stacking projector starts at stage 2"
            )
        if transcriber.tokenizer is None:
            raise StageError(
                "speech stage 1 over Whisper's decoder states needs Whisper's tokenizer.json "
                "beside its checkpoint (the text of each written token)"
            )
    if config.stage == 3 and not model.interfaces():
        raise StageError("the model has no interfaces to train")


def mark_trainable(modules: dict[str, nn.Module], prefixes: Sequence[str]) -> list[str]:
    """Set requires_grad on parameters under the prefixes (and only those); return their names."""
    chosen = []
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in _named(modules)):
            known = sorted({".".join(n.split(".")[:2]) for n in _named(modules)})
            raise StageError(f"trainable '{prefix}' matches no parameter; known: {known}")
    for name, param in _named(modules).items():
        param.requires_grad_(any(_under(name, p) for p in prefixes))
        if param.requires_grad:
            chosen.append(name)
    return chosen


def set_train_mode(objective: nn.Module) -> None:
    """Train mode where something trains; frozen parts (e.g. a frozen Q-Former) stay in eval
    mode, without dropout."""
    objective.train()
    for module in objective.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _named(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {f"{k}.{n}": p for k, m in modules.items() for n, p in m.named_parameters()}


def init_video_from_image(model: XLLM) -> None:
    """X-LLM starts V2L from I2L: the video Q-Former, queries and projection copy the image ones
    (frame positions stay zero, so the video path starts as the image path run per frame)."""
    image, video = model.image_interface, model.video_interface
    assert image is not None and video is not None
    with torch.no_grad():
        video.qformer.load_state_dict(image.qformer.state_dict())
        video.query_tokens.copy_(image.query_tokens)
        video.projection.load_state_dict(image.projection.state_dict())


# --- objectives ---------------------------------------------------------------------------


class StepOutput(NamedTuple):
    """A named tuple, which DDP knows how to search for the tensors of the backward pass."""

    loss: torch.Tensor  # what backward() runs on
    parts: dict[str, float]  # named loss terms for the log
    samples: int


class Objective(nn.Module):
    """Base: registers the interfaces (and heads), holds the frozen model unregistered."""

    def __init__(self, model: XLLM) -> None:
        super().__init__()
        self.interfaces = nn.ModuleDict(model.interfaces())
        object.__setattr__(self, "model", model)  # not a submodule: DDP must not see the LLM

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def empty_loss(self) -> torch.Tensor:
        """Zero that touches every trainable parameter: a rank whose batch was all bad rows still
        joins DDP's gradient all-reduce."""
        params = [p.reshape(-1)[0] for p in self.parameters() if p.requires_grad]
        return torch.stack(params).sum() * 0.0


class LMObjective(Objective):
    """Stages 2 and 3: LM cross-entropy on the answer tokens of each conversation."""

    def forward(self, samples: Sequence[Sample]) -> StepOutput:
        model: XLLM = self.model
        if not samples:
            return StepOutput(self.empty_loss() + self._idle_llm(), {}, 0)
        counts = [len(s.media) for s in samples]
        encoded = model.encode([m for s in samples for m in s.media])
        layouts, embeds, start = [], [], 0
        for sample, count in zip(samples, counts, strict=True):
            items = encoded[start : start + count]
            start += count
            layout = model.layout(messages_for(sample.example), items, add_generation_prompt=False)
            layouts.append(layout)
            embeds.append(model.embed(layout, items))  # (L_i, H)
        # Left padding: rows end together, so their final answers share positions and the LM
        # head runs over few of them (`answer_loss`).
        batch = collate(embeds, layouts, padding_side="left")  # (B, L, H), labels (B, L)
        loss = answer_loss(model.llm, batch)
        return StepOutput(loss, {"lm": loss.item()}, len(samples))

    def _idle_llm(self) -> torch.Tensor:
        """A one-token LLM forward times zero: with FSDP every rank must run each forward."""
        llm = self.model.llm
        embed = llm.get_input_embeddings().weight[:1][None]  # (1, 1, H)
        return llm(inputs_embeds=embed).logits.sum() * 0.0


def answer_loss(llm: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens (labels != -100) of a batch: HF's
    causal-LM loss (position t predicts label t + 1, float32 logits).

    Logits are made only at the positions that predict a label (`logits_to_keep`: the union
    over rows, K of L), not at all B x L: an answer is a few tokens of a row mostly made of
    template and media, and the LM head over a 49k-151k vocabulary, forward and backward, would
    otherwise cost as much as several decoder layers.
    """
    assert batch.labels is not None
    targets = batch.labels[:, 1:]  # (B, L - 1): what position t predicts
    positions = (targets != -100).any(dim=0).nonzero().squeeze(1)  # (K,)
    logits = llm(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=positions,
    ).logits  # (B, K, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, positions].flatten())


class ImageTextHeads(nn.Module):
    """BLIP-2 stage-1 text side, small: token embeddings + a transformer shared by ITC and ITG.

    ITC: [CLS] + text through the tower bidirectionally; its [CLS] state is compared with every
    query output, the best query giving the image-text similarity. ITG: queries (which only see
    each other) followed by [DEC] + text under a causal mask in which text sees all queries; the
    text must be regenerated from what the queries extracted.
    """

    def __init__(
        self, vocab: int, hidden: int, layers: int, heads: int, max_len: int, embed_dim: int = 256
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_len + 1, hidden)  # +1 for [CLS] / [DEC]
        self.cls = nn.Parameter(torch.randn(hidden) * 0.02)
        self.dec = nn.Parameter(torch.randn(hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.tower = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.lm_head = nn.Linear(hidden, vocab)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's temperature

    def text_input(self, ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, 1 + T, D): [first] + tokens, with positions."""
        tokens = torch.cat([first.expand(ids.shape[0], 1, -1), self.token(ids)], dim=1)
        positions = torch.arange(tokens.shape[1], device=ids.device)
        return tokens + self.position(positions)

    def itc(
        self, queries: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor, same_text: torch.Tensor
    ) -> torch.Tensor:
        """queries (B, Q, D), ids/pad (B, T), same_text (B, B) True where captions are equal."""
        keep = torch.cat([pad.new_zeros(pad.shape[0], 1), pad], dim=1)  # [CLS] is never padding
        states = self.norm(self.tower(self.text_input(ids, self.cls), src_key_padding_mask=keep))
        text = F.normalize(self.text_proj(states[:, 0]), dim=-1)  # (B, E)
        image = F.normalize(self.vision_proj(queries), dim=-1)  # (B, Q, E)
        sim = torch.einsum("iqe,je->ijq", image, text).amax(dim=-1)  # (B_img, B_txt)
        logits = sim * self.log_scale.clamp(max=math.log(100)).exp()
        # Identical captions in a batch are all positives (the toy world repeats them often).
        target = same_text.float() / same_text.sum(dim=1, keepdim=True)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def itg(self, queries: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Next-token loss of ids (B, T) given the queries; position t (after [DEC]) predicts t."""
        q, t = queries.shape[1], ids.shape[1]
        text = self.text_input(ids[:, :-1], self.dec)  # (B, T, D): [DEC] t0 .. t_{T-2}
        sequence = torch.cat([queries, text], dim=1)  # (B, Q + T, D)
        # Additive mask (Q + T, Q + T): queries see queries; text sees queries + earlier text.
        blocked = torch.ones(q + t, q + t, dtype=torch.bool, device=ids.device)
        blocked[:, :q] = False
        blocked[q:, q:] = torch.triu(blocked[q:, q:], diagonal=1)
        keep = torch.cat([pad.new_zeros(pad.shape[0], q), pad], dim=1)
        states = self.norm(self.tower(sequence, mask=blocked, src_key_padding_mask=keep))
        logits = self.lm_head(states[:, q:])  # (B, T, V)
        targets = ids.masked_fill(pad, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class ImageStage1(Objective):
    """Q-Former + image queries against the frozen ViT, with ITC + ITG."""

    def __init__(self, model: XLLM, config: TrainConfig) -> None:
        super().__init__(model)
        assert model.image_interface is not None
        hidden = model.image_interface.qformer.config.hidden_size
        self.heads = ImageTextHeads(
            len(model.tokenizer),
            hidden,
            config.text_layers,
            config.text_heads,
            config.max_text_tokens,
        )
        self.itc_weight, self.itg_weight = config.itc_weight, config.itg_weight
        self.max_tokens = config.max_text_tokens

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"image.{k}": v for k, v in self.heads.state_dict().items()}

    def forward(self, samples: Sequence[Sample]) -> StepOutput:
        if not samples:
            return StepOutput(self.empty_loss(), {}, 0)
        model: XLLM = self.model
        interface = model.image_interface
        assert model.vision is not None and interface is not None
        pixels = torch.cat([s.media[0].pixels for s in samples]).to(model.device)  # (B, 3, S, S)
        patches = model.vision(pixels)  # frozen: no graph is recorded
        queries = interface.query(patches, interface.query_tokens)  # (B, Q, D)
        texts = [s.example.text or "" for s in samples]
        ids, pad = text_ids(model, texts, self.max_tokens, queries.device)  # (B, T) each
        same = torch.tensor(
            [[a.lower() == b.lower() for b in texts] for a in texts], device=queries.device
        )
        itc = self.heads.itc(queries, ids, pad, same)
        itg = self.heads.itg(queries, ids, pad)
        loss = self.itc_weight * itc + self.itg_weight * itg
        return StepOutput(loss, {"itc": itc.item(), "itg": itg.item()}, len(samples))


def text_ids(
    model: XLLM, texts: Sequence[str], max_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-tokenizer ids + EOS, right-padded: (ids (B, T), pad mask (B, T) True on padding)."""
    eos = model.tokenizer.eos_token_id or 0
    rows = [
        [*model.tokenizer(t, add_special_tokens=False)["input_ids"][: max_tokens - 1], eos]
        for t in texts
    ]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), eos, dtype=torch.long)
    pad = torch.ones(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        pad[i, : len(row)] = False
    return ids.to(device), pad.to(device)


def nearness(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """tokens (N, H), embedding table (V, H) -> (N, V): minus each token's squared distance to
    each entry up to a per-token constant (2 x.E_v - |E_v|^2); its argmax is the nearest entry."""
    return 2 * tokens @ table.T - table.pow(2).sum(-1)


# A token on its own embedding E_y out-scores another entry E_v by
# READOUT_SHARPNESS * |E_y - E_v|^2 / mean |E|^2 nats: ~10-20 for unrelated entries.
READOUT_SHARPNESS = 10.0


class SpeechStage1(Objective):
    """C-Former against the frozen Whisper encoder and the frozen LLM's embedding table: CIF
    quantity loss + per-fire token cross-entropy read through that table.

    CIF fires exactly one vector per transcript token (LLM tokenizer) and the C-Former's
    projection maps it into the LLM's input space; the logit of vocabulary entry v is minus the
    squared distance to its embedding E_v (softmax-equivalent to 2 x.E_v - |E_v|^2), scaled by
    READOUT_SHARPNESS over the table's mean squared norm, and the squared distance to the
    target's embedding (same unit) is a loss of its own (`embedding_weight`). So the
    interface learns language-like tokens in the LLM's own embedding space (X-LLM's stage 1:
    speech as a foreign language the LLM already reads), and no head is trained beside it. The
    cross-entropy alone pushes tokens past their embeddings (its logits are linear in the token),
    to 4x the embeddings' norm, where the frozen LLM no longer reads them as words; the distance
    term holds each token at the embedding it stands for.
    """

    def __init__(self, model: XLLM, config: TrainConfig) -> None:
        super().__init__(model)
        assert isinstance(model.speech_interface, CFormer)
        self.quantity_weight = config.quantity_weight
        self.embedding_weight = config.embedding_weight
        self.max_tokens = config.max_text_tokens

    def forward(self, samples: Sequence[Sample]) -> StepOutput:
        if not samples:
            return StepOutput(self.empty_loss(), {}, 0)
        model: XLLM = self.model
        cformer = model.speech_interface
        assert isinstance(cformer, CFormer)
        frames = model.speech_frames([s.media[0] for s in samples])  # frozen: [(T_i, De)]
        targets = [
            model.tokenizer(s.example.text or "", add_special_tokens=False)["input_ids"][
                : self.max_tokens
            ]
            for s in samples
        ]
        # Training fires exactly len(target) vectors, one per token to predict.
        compressed = [cformer.compress(f, len(t)) for f, t in zip(frames, targets, strict=True)]
        states = cformer.encode_fires([fires for fires, _ in compressed])  # [(N_i, hidden)]
        tokens = cformer.projection(torch.cat(states)).float()  # (sum N_i, H): what the LLM reads
        table = model.llm.get_input_embeddings().weight.detach().float()  # (V, H), frozen
        # Squared distances in units of the table's mean squared norm, so the read-out's
        # sharpness does not depend on the LLM's embedding scale.
        unit = table.pow(2).sum(-1).mean()
        logits = nearness(tokens, table) * (READOUT_SHARPNESS / unit)  # (N, V)
        labels = torch.tensor([i for t in targets for i in t], device=logits.device)
        ce = F.cross_entropy(logits, labels)
        distance = (tokens - table[labels]).pow(2).sum(-1).mean() / unit
        quantity = torch.stack(
            [quantity_loss(q, len(t)) for (_, q), t in zip(compressed, targets, strict=True)]
        ).mean()
        loss = ce + self.embedding_weight * distance + self.quantity_weight * quantity
        parts = {
            "ce": ce.item(),
            "distance": distance.item(),
            "quantity": quantity.item(),
            "token_accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        }
        return StepOutput(loss, parts, len(samples))


class DecoderStateStage1(Objective):
    """Speech stage 1 for a projector over Whisper's decoder states (speech_states "decoder"):
    each state's token is put on the frozen LLM's embedding of the text Whisper wrote from it.

    No transcript is needed: Whisper's own output layer says which token a state wrote, its
    tokenizer that token's text, and the LLM's tokenizer and table what the LLM reads for that
    text (the mean embedding where it takes several LLM tokens; most word pieces take one). The
    loss is the squared distance in units of the table's mean squared norm; `token_accuracy`:
    how often a piece of one LLM token lands nearest that token's embedding.
    """

    def __init__(self, model: XLLM) -> None:
        super().__init__(model)
        self.pieces = model.whisper_pieces

    def forward(self, samples: Sequence[Sample]) -> StepOutput:
        if not samples:
            return StepOutput(self.empty_loss(), {}, 0)
        model: XLLM = self.model
        assert model.speech is not None and model.speech.transcriber is not None
        assert model.speech_interface is not None
        states = torch.cat(model.speech_frames([s.media[0] for s in samples]))  # frozen (N, D)
        decoder_dtype = model.speech.transcriber.decoder.embed_tokens.weight.dtype
        written = model.speech.transcriber.written(states.to(decoder_dtype))
        targets = [self.pieces[t] for t in written]
        keep = [i for i, ids in enumerate(targets) if ids]  # pieces of no text are not read
        if not keep:
            return StepOutput(self.empty_loss(), {}, 0)
        (tokens,) = model.speech_tokens([states[keep]])  # (K, H): one token per state
        table = model.llm.get_input_embeddings().weight.detach().float()  # (V, H), frozen
        kept = torch.tensor([written[i] for i in keep])
        want = piece_embeddings(self.pieces.table, kept, table)  # (K, H)
        unit = table.pow(2).sum(-1).mean()
        loss = (tokens.float() - want).pow(2).sum(-1).mean() / unit
        parts = {}
        single = [j for j, i in enumerate(keep) if len(targets[i]) == 1]
        if single:  # a mean of several embeddings is no table entry: only one-token pieces count
            with torch.no_grad():
                scores = nearness(tokens[single].float(), table)  # (S, V)
                labels = torch.tensor([targets[keep[j]][0] for j in single], device=scores.device)
                parts["token_accuracy"] = (scores.argmax(-1) == labels).float().mean().item()
        return StepOutput(loss, parts, len(samples))


def build_objective(config: TrainConfig, model: XLLM) -> Objective:
    if config.stage == 1:
        if config.modality == "image":
            return ImageStage1(model, config)
        if isinstance(model.speech_interface, CFormer):
            return SpeechStage1(model, config)
        return DecoderStateStage1(model)
    return LMObjective(model)


def media_token_estimate(model: XLLM) -> dict[Modality, int]:
    """Rough LLM positions each media item takes, for length bucketing."""
    queries = model.image_interface.num_query_tokens if model.image_interface else 32
    frames = model.video_interface.max_frames if model.video_interface else 8
    return {"image": queries, "video": queries * frames, "audio": 50}
