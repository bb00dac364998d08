"""The recipe's pre-training phases: each trains one frozen component of the toy world from
scratch (or continues one) and saves it into BASE/llm, BASE/vision or BASE/speech."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xllm.model.recipes.toy_world import Scale


@dataclass
class ComponentPhases:
    """The phases tokenizer, llm, llm-tune, vision, vision-tune*, speech, speech-tune."""

    base: Path  # the base model directory the components are saved into
    scale: Scale
    seed: int
    jobs: int  # processes for rendering images (speech runs 4x as many espeak-ng threads)

    def llm_tokenizer(self) -> Any:
        """The tokenizer the `tokenizer` phase saved (the LLM's, which CTC targets use too)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base / "llm")

    def tokenizer(self) -> dict[str, Any]:
        from xllm.model.recipes.pretrain_llm import build_tokenizer

        tokenizer = build_tokenizer(self.seed)
        tokenizer.save_pretrained(self.base / "llm")
        return {"vocab": len(tokenizer)}

    def llm(self) -> dict[str, Any]:
        from xllm.model.recipes.pretrain_llm import LMSize, pretrain_lm

        tokenizer = self.llm_tokenizer()
        s = self.scale
        size = LMSize(hidden=s.lm_hidden, layers=s.lm_layers, intermediate=3 * s.lm_hidden)
        model, figures = pretrain_lm(
            tokenizer,
            queries=s.queries,
            max_frames=s.max_frames,
            size=size,
            steps=s.lm_steps,
            batch_size=s.lm_batch,
            pool=s.lm_pool,
            seed=self.seed,
        )
        model.save_pretrained(self.base / "llm")
        figures["params"] = sum(p.numel() for p in model.parameters())
        return figures

    def vision(self) -> dict[str, Any]:
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        from xllm.model.recipes.pretrain_vision import pretrain_vision

        s = self.scale
        model, figures = pretrain_vision(
            image_size=s.image_size,
            patch=s.patch,
            hidden=s.vision_hidden,
            layers=s.vision_layers,
            pool=s.vision_pool,
            steps=s.vision_steps,
            batch_size=s.vision_batch,
            jobs=self.jobs,
            seed=self.seed,
        )
        model.save_pretrained(self.base / "vision")
        size = {"height": s.image_size, "width": s.image_size}
        BlipImageProcessorPil(size=size).save_pretrained(self.base / "vision")
        figures["params"] = sum(p.numel() for p in model.parameters())
        return figures

    def llm_tune(self) -> dict[str, Any]:
        """More LLM steps on fresh dialogues, with the "\\n" after <|assistant|> as a target."""
        from xllm.model.recipes.pretrain_llm import LMSize, pretrain_lm

        tokenizer = self.llm_tokenizer()
        s = self.scale
        model, figures = pretrain_lm(
            tokenizer,
            queries=s.queries,
            max_frames=s.max_frames,
            size=LMSize(),
            steps=s.lm_tune_steps,
            batch_size=s.lm_batch,
            pool=s.lm_pool // 2,
            lr=1e-3,
            seed=self.seed,
            init=str(self.base / "llm"),
        )
        model.save_pretrained(self.base / "llm")
        return figures

    def speech_tune(self) -> dict[str, Any]:
        """More CTC steps on fresh clips (a fresh CTC head on the pre-trained encoder)."""
        from xllm.model.recipes.pretrain_speech import pretrain_speech

        s = self.scale
        if not s.speech_tune_steps:
            return {"skipped": True}
        tokenizer = self.llm_tokenizer()
        model, _, figures = pretrain_speech(
            tokenizer,
            window_seconds=s.window_seconds,
            clips=s.speech_clips,
            steps=s.speech_tune_steps,
            batch_size=s.speech_batch,
            lr=1e-3,
            jobs=max(4, 4 * self.jobs),
            seed=self.seed,
            init=str(self.base / "speech"),
        )
        model.save_pretrained(self.base / "speech")
        return figures

    def vision_tune(self, round: int) -> dict[str, Any]:
        """More vision steps on a fresh pool of images, with this round's schedule (1-based)."""
        from xllm.model.recipes.pretrain_vision import pretrain_vision

        s = self.scale
        steps, lr = s.vision_tune[round - 1]
        model, figures = pretrain_vision(
            init=str(self.base / "vision"),
            pool=s.vision_pool,
            steps=steps,
            batch_size=64,
            lr=lr,
            jobs=self.jobs,
            seed=self.seed + round - 1,
        )
        model.save_pretrained(self.base / "vision")
        return figures

    def speech(self) -> dict[str, Any]:
        from xllm.model.recipes.pretrain_speech import pretrain_speech

        s = self.scale
        tokenizer = self.llm_tokenizer()
        model, extractor, figures = pretrain_speech(
            tokenizer,
            d_model=s.whisper_hidden,
            layers=s.whisper_layers,
            window_seconds=s.window_seconds,
            clips=s.speech_clips,
            steps=s.speech_steps,
            batch_size=s.speech_batch,
            jobs=max(4, 4 * self.jobs),
            seed=self.seed,
        )
        model.save_pretrained(self.base / "speech")
        extractor.save_pretrained(self.base / "speech")
        figures["params"] = sum(p.numel() for p in model.parameters())
        return figures
