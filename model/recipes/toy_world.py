"""The toy-world model from nothing: `python -m xllm.model.recipes.toy_world --out DIR`.

Phases (each logged with its time and figures in DIR/phases/NAME.json and DIR/recipe.json; a
finished phase is skipped when the command is run again, so an interrupted build continues):

    tokenizer   byte-level BPE trained with `tokenizers` on the world's text
    then four lanes in parallel (one process and one torch thread each):
    lane-llm      llm: a small GlmForCausalLM pre-trained on toy-world dialogues whose answers
                  must be read out of the media spans (a copy test measures it); llm-tune: a
                  continuation on fresh dialogues
    lane-vision   vision: a small Blip2VisionModel pre-trained on toy images (colour, shape,
                  background, centre, which patches the shape covers); vision-tune,
                  vision-tune2, ...: continuations, each on a fresh pool with its own schedule
    lane-speech   speech: a small WhisperEncoder pre-trained with CTC on espeak-ng speech (every
                  accent; some voice variants and speeds held out for evaluation); speech-tune
    data          DIR/data: `xllm data toy`-format manifests (training voices only) and
                  DIR/heldout-voices: speech in held-out variants and speeds
    base        DIR/base: xllm.json + llm/ + vision/ + speech/ + fresh interfaces
    chain-vision  `xllm train` stage 1 image -> stage 2 image -> stage 2 video
    chain-speech  `xllm train` stage 1 speech -> stage 2 speech   (the chains run in parallel;
                they train disjoint interfaces)
    merge       one directory with both chains' interfaces
    stage3      `xllm train --stage 3` on the mixed instructions (projections only)
    export      DIR/model: the self-contained model directory (`xllm serve --model DIR/model`)

Every part of it, the LLM included, is trained here on the toy world: the project's first model,
kept as a complete from-nothing run of the pipeline (the packaged default is built by
`default_model.py` from real pretrained parts). `--scale small` is the reduced size the tests use.

This module holds the sizes (`Scale`), the order of the phases and the command line; the phases
themselves are in `components.py` (pre-training), `data.py`, `model_dirs.py` (base, merge,
export) and `xllm train`; `phases.py` runs them and records their figures.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllm.model.recipes.components import ComponentPhases
from xllm.model.recipes.model_dirs import assemble_base, export_model, merge_chains
from xllm.model.recipes.phases import Phase, PhasedRecipe, recipe_main

log = logging.getLogger("xllm.recipe")


@dataclass
class Scale:
    """Every size and step count of the recipe."""

    queries: int = 4  # Q-Former queries per image / video frame
    max_frames: int = 8
    video_fps: float = 4.0
    # LLM
    lm_hidden: int = 96
    lm_layers: int = 3
    lm_steps: int = 900
    lm_batch: int = 24
    lm_pool: int = 6000
    lm_tune_steps: int = 300
    # vision tower
    image_size: int = 64
    patch: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_pool: int = 16000
    vision_steps: int = 700
    vision_batch: int = 48
    # continuations: (steps, lr) per round, each on a fresh pool (phases vision-tune, -tune2, ...).
    # The tower's shape reading limits image answers, and each round on fresh images raises it
    # (figures per round: DEMO_MODEL.md, "Phases").
    vision_tune: tuple[tuple[int, float], ...] = (
        (2500, 2e-3),
        (2500, 1e-3),
        (4000, 1e-3),
        (3000, 1e-3),
    )
    # speech encoder
    whisper_hidden: int = 96
    whisper_layers: int = 4
    window_seconds: int = 4
    speech_clips: int = 4000
    speech_steps: int = 2000
    speech_batch: int = 16
    # 0: every CTC step is in the encoder's own phase: a continuation restarts the CTC head,
    # which costs more than its steps gain (DEMO_MODEL.md, "Lessons")
    speech_tune_steps: int = 0
    # interfaces
    qformer_hidden: int = 64
    qformer_layers: int = 2
    cformer_hidden: int = 64
    # toy data for xllm train
    data_n: dict[str, int] = field(
        default_factory=lambda: {"image": 1200, "speech": 1200, "video": 400, "mixed": 600}
    )
    heldout_n: int = 200
    # xllm train: stage -> (steps, batch size, lr)
    stages: dict[str, tuple[int, int, float]] = field(
        default_factory=lambda: {
            "stage1-image": (100, 32, 1e-3),
            "stage1-speech": (600, 16, 1e-3),
            "stage2-image": (1200, 16, 1e-3),
            "stage2-video": (1500, 8, 1e-3),
            # Long: a shorter run leaves the speech interface undertrained although its training
            # loss looks low (DEMO_MODEL.md, "Lessons")
            "stage2-speech": (2000, 16, 1e-3),
            # Chosen on two held-out sets, confirmed on a third (DEMO_MODEL.md, "How stage 3's
            # length was chosen")
            "stage3": (1200, 8, 3e-4),
        }
    )


SMALL = Scale(
    lm_steps=300,
    lm_pool=3000,
    vision_pool=3000,
    vision_steps=250,
    vision_tune=((50, 2e-3),),
    lm_tune_steps=50,
    speech_tune_steps=50,
    whisper_hidden=64,  # the slow test checks the plumbing: the narrow encoder is enough
    whisper_layers=2,
    speech_clips=400,
    speech_steps=150,
    data_n={"image": 96, "speech": 96, "video": 48, "mixed": 96},
    heldout_n=16,
    stages={
        "stage1-image": (20, 16, 1e-3),
        "stage1-speech": (20, 8, 1e-3),
        "stage2-image": (120, 16, 2e-3),
        "stage2-video": (20, 4, 1e-3),
        "stage2-speech": (20, 8, 1e-3),
        "stage3": (20, 4, 3e-4),
    },
)
# Plumbing only (a few steps per phase): checks that every phase runs.
SMOKE = Scale(
    lm_steps=2,
    lm_pool=64,
    vision_pool=64,
    vision_steps=2,
    vision_tune=((2, 2e-3), (2, 1e-3)),
    lm_tune_steps=2,
    speech_tune_steps=2,
    speech_clips=16,
    speech_steps=2,
    data_n={"image": 8, "speech": 8, "video": 8, "mixed": 8},
    heldout_n=4,
    stages={name: (2, 2, 1e-3) for name in SMALL.stages},
)
SCALES = {"full": Scale(), "small": SMALL, "smoke": SMOKE}

# The recipe's `xllm train` runs: name -> (--stage, --modality).
STAGE_RUNS = {
    "stage1-image": ("1", "image"),
    "stage1-speech": ("1", "speech"),
    "stage2-image": ("2", "image"),
    "stage2-video": ("2", "video"),
    "stage2-speech": ("2", "speech"),
    "stage3": ("3", "all"),
}


class Recipe(PhasedRecipe):
    """The recipe's phases on one work directory (`out`), at one scale and seed."""

    name = "toy-world"
    module = "xllm.model.recipes.toy_world"
    scales = SCALES
    stage_runs = STAGE_RUNS

    @property
    def base(self) -> Path:
        return self.out / "base"

    # --- data ------------------------------------------------------------------------------
    def data(self) -> dict[str, Any]:
        from xllm.model.recipes.data import generate_heldout_speech, generate_training_toy

        s = self.scale
        start = time.time()
        written = generate_training_toy(self.out / "data", s.data_n, self.seed, self.jobs)
        train_seconds = time.time() - start
        heldout = generate_heldout_speech(
            self.out / "heldout-voices", s.heldout_n, self.seed + 1, self.jobs
        )
        return {
            "train_seconds": round(train_seconds, 1),
            "manifests": sorted(written),
            "heldout_speech": str(heldout),
        }

    def export(self) -> dict[str, Any]:
        """DIR/model: base components + the final interfaces, paths relative (self-contained)."""
        target = self.out / "model"
        export_model(self.base, self.out / "runs" / "stage3", target)
        self.save_record()
        (target / "recipe.json").write_text(json.dumps(self.record, indent=2) + "\n")
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        return {"bytes": size}

    def vision_rounds(self) -> list[str]:
        return ["vision"] + [
            f"vision-tune{i if i > 1 else ''}" for i in range(1, len(self.scale.vision_tune) + 1)
        ]

    def phases(self) -> dict[str, Phase]:
        base, runs = self.base, self.out / "runs"
        components = ComponentPhases(self.base, self.scale, self.seed, self.jobs)

        def train(stage: str, model: Path) -> Callable[[], dict[str, Any]]:
            return lambda: self.train(stage, model)

        phases: dict[str, Phase] = {
            "tokenizer": components.tokenizer,
            "llm": components.llm,
            "llm-tune": components.llm_tune,
            "vision": components.vision,
            "speech": components.speech,
            "speech-tune": components.speech_tune,
            "data": self.data,
            "base": lambda: assemble_base(base, self.scale, self.seed),
            "stage1-image": train("stage1-image", base),
            "stage2-image": train("stage2-image", runs / "stage1-image"),
            "stage2-video": train("stage2-video", runs / "stage2-image"),
            "stage1-speech": train("stage1-speech", base),
            "stage2-speech": train("stage2-speech", runs / "stage1-speech"),
            "merge": lambda: merge_chains(runs),
            "stage3": train("stage3", runs / "merged"),
            "export": self.export,
        }
        for round, name in enumerate(self.vision_rounds()[1:], start=1):
            phases[name] = lambda round=round: components.vision_tune(round)
        # Lanes: phases that depend on each other, run as one process beside the other lanes.
        lanes = {
            "lane-llm": ["llm", "llm-tune"],
            "lane-vision": self.vision_rounds(),
            "lane-speech": ["speech", "speech-tune"],
            # Two independent chains of `xllm train` (they train disjoint interfaces).
            "chain-vision": ["stage1-image", "stage2-image", "stage2-video"],
            "chain-speech": ["stage1-speech", "stage2-speech"],
        }
        for lane, names in lanes.items():
            phases[lane] = lambda names=names: self.lane(names)
        return phases

    def run(self, stop_after: str | None = None) -> None:
        start = time.time()
        phases = self.phases()
        self.records.run("tokenizer", phases["tokenizer"])
        # The three frozen components and the toy data do not depend on each other.
        self.parallel(["lane-llm", "lane-vision", "lane-speech", "data"])
        self.records.run("base", phases["base"])
        self.parallel(["chain-vision", "chain-speech"])
        for name in ("merge", "stage3", "export"):
            self.records.run(name, phases[name])
            if name == stop_after:
                break
        self.record["total_seconds_this_run"] = round(time.time() - start, 1)
        self.save_record()


def main(argv: list[str] | None = None) -> int:
    return recipe_main(
        argv,
        Recipe,
        "Build the toy-world model from nothing (pre-training + xllm train 1-3).",
    )


if __name__ == "__main__":
    sys.exit(main())
