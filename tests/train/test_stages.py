"""Each stage trains from the CLI on toy data and its loss falls; outputs load and generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import TOY_ROWS
from tests.train.helpers import stage_args, train

# (stage, modality, manifest, lr, steps): one fixed batch of all rows, overfitted.
RUNS = [
    (1, "image", "image_train.jsonl", "3e-3", 8),
    (1, "speech", "speech_train.jsonl", "3e-3", 8),
    (2, "image", "image_train.jsonl", "1e-2", 8),
    (2, "speech", "speech_train.jsonl", "1e-2", 8),
    (2, "video", "video_train.jsonl", "1e-2", 8),
    (3, "all", "mixed_train.jsonl", "3e-2", 8),
]


@pytest.mark.parametrize(("stage", "modality", "manifest", "lr", "steps"), RUNS)
def test_stage_loss_falls(
    tiny_model_dir: Path, toy_dir: Path, tmp_path: Path, stage, modality, manifest, lr, steps
) -> None:
    out = tmp_path / "out"
    args = stage_args(stage, modality, steps, TOY_ROWS)
    metrics = train(tiny_model_dir, toy_dir / manifest, out, *args, "--lr", lr)
    losses = [m["loss"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all("lr" in m for m in metrics)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert (out / "checkpoints" / "latest").is_file()
    interfaces = load_file(str(out / "interfaces.safetensors"))
    # Only interface weights go to interfaces.safetensors; stage-1 heads are kept apart.
    assert {k.split(".")[0] for k in interfaces} <= {
        "image_interface",
        "video_interface",
        "speech_interface",
    }
    assert (out / "stage1_heads.safetensors").is_file() == (stage == 1 and modality == "image")


def test_trained_model_generates_and_loads(tiny_model_dir: Path, toy_dir: Path, tmp_path: Path):
    """The output dir is a model dir: `xllm generate` answers from it, load_model loads it."""
    from xllm.model.checkpoint import load_model

    out = tmp_path / "out"
    train(tiny_model_dir, toy_dir / "image_train.jsonl", out, *stage_args(2, "image", 2, 3))
    model = load_model(out, device="cpu")
    trained = load_file(str(out / "interfaces.safetensors"))
    loaded = model.interface_state_dict()
    assert all((loaded[k] == v).all() for k, v in trained.items())
    image = sorted((toy_dir / "images").glob("train-*"))[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xllm",
            "generate",
            "--model",
            str(out),
            "--image",
            str(image),
            "--prompt",
            "What is in the image?",
            "--max-tokens",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_video_stage_trains_its_own_qformer_from_the_image_one(
    tiny_model_dir: Path, toy_dir: Path, tmp_path: Path
) -> None:
    """Stage 2 video copies the image Q-Former, queries and projection into the video interface
    and trains the video Q-Former (cross-attention included); the image interface is untouched."""
    from xllm.model.checkpoint import load_model
    from xllm.model.train.stages import init_video_from_image

    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    image, video = model.image_interface, model.video_interface
    assert image is not None and video is not None
    init_video_from_image(model)
    for name, value in image.state_dict().items():
        torch.testing.assert_close(video.state_dict()[name], value)
    assert not {p.data_ptr() for p in image.parameters()} & {
        p.data_ptr() for p in video.parameters()
    }

    out = tmp_path / "out"
    args = stage_args(2, "video", 2, 2)
    train(tiny_model_dir, toy_dir / "video_train.jsonl", out, *args, "--lr", "1e-2")
    before = load_file(str(tiny_model_dir / "interfaces.safetensors"))
    after = load_file(str(out / "interfaces.safetensors"))
    for name, value in before.items():
        if name.startswith("image_interface."):
            torch.testing.assert_close(after[name], value)
    cross = [k for k in after if k.startswith("video_interface.qformer.") and "crossattention" in k]
    assert cross
    # Trained from the image Q-Former: near the image weights, but moved.
    for name in cross:
        image_weight = after[name.replace("video_interface.", "image_interface.", 1)]
        moved = (after[name] - image_weight).abs().max().item()
        assert 0 < moved < 0.1, (name, moved)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_loss_equals_hfs_loss_over_every_position(tiny_model, padding_side: str):
    """The LM loss computed only at the positions that predict an answer token is HF's causal-LM
    loss over the whole batch (same value, same gradient into the spliced media embeddings)."""
    from xllm.model.prompt import bind_media, collate
    from xllm.model.train.stages import answer_loss

    torch.manual_seed(0)
    model, hidden = tiny_model, tiny_model.llm.config.hidden_size
    conversations = [
        [("user", "What is in the picture?"), ("assistant", "A red circle.")],
        [("user", "Say something much longer than the other row, please."), ("assistant", "No.")],
        [("user", "Two turns"), ("assistant", "One"), ("user", "and"), ("assistant", "two.")],
    ]
    layouts = [
        model.layout(bind_media(c, []), [], add_generation_prompt=False) for c in conversations
    ]
    media = torch.randn(len(layouts), 1, hidden, requires_grad=True)  # stands in for media
    embeds = [
        torch.cat([m, model.embed(layout, [])[1:]])
        for m, layout in zip(media, layouts, strict=True)
    ]  # (L_i, H) each, first position from `media`
    batch = collate(embeds, layouts, padding_side=padding_side)
    assert (batch.labels[:, 1:] != -100).sum() < batch.labels.numel() // 2  # answers are few

    ours = answer_loss(model.llm, batch)
    (ours_grad,) = torch.autograd.grad(ours, media, retain_graph=True)  # batch is reused
    theirs = model.llm(
        inputs_embeds=batch.inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
    ).loss
    (theirs_grad,) = torch.autograd.grad(theirs, media)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)
    assert ours_grad.abs().sum() > 0


def test_speech_stage1_tokens_read_as_the_transcript(
    tiny_model_dir: Path, toy_dir: Path, tmp_path: Path
) -> None:
    """Stage 1 trains the whole C-Former, projection included, into the frozen LLM's embedding
    space: through the model's own inference path (CIF firing round(sum alpha) tokens), the
    nearest embeddings of the tokens spell the transcript, where the untrained ones do not."""
    from xllm.model.checkpoint import load_model
    from xllm.model.train.data import read_manifest

    def readout_accuracy(model_dir: Path) -> float:
        model = load_model(model_dir, device="cpu")
        table = model.llm.get_input_embeddings().weight.float()  # (V, H)
        right = total = 0
        for example in read_manifest(toy_dir / "speech_train.jsonl").examples:
            item = model.preparer.prepare_file(example.media[0][1], "audio")
            with torch.inference_mode():
                ((_, tokens),) = model.encode([item])[0]  # (N, H)
            nearest = torch.cdist(tokens.float(), table).argmin(-1).tolist()
            target = model.tokenizer(example.text, add_special_tokens=False)["input_ids"]
            right += sum(a == b for a, b in zip(nearest, target, strict=False))
            total += len(target)
        return right / total

    out = tmp_path / "out"
    args = stage_args(1, "speech", 120, TOY_ROWS)
    train(tiny_model_dir, toy_dir / "speech_train.jsonl", out, *args, "--lr", "1e-2")
    assert readout_accuracy(tiny_model_dir) < 0.1
    assert readout_accuracy(out) > 0.35  # chance: 1 in the vocabulary (512)


@pytest.mark.parametrize("modality", ["speech", "image"])
def test_stage2_on_a_folder_takes_every_row_of_its_modality_alone(
    tiny_model, tiny_model_dir: Path, toy_dir: Path, modality: str
) -> None:
    """Stage 2 reads every *_train.jsonl of a --data folder and keeps the rows whose only media
    is its modality: speech aligns on the mixed manifest's audio-only turns beside the
    transcripts (spoken questions, in the default recipe), never on rows with other media."""
    from xllm.model.train.config import TrainConfig
    from xllm.model.train.distributed import Dist
    from xllm.model.train.loop import stage_dataset

    config = TrainConfig(stage=2, modality=modality, model=tiny_model_dir, data=toy_dir)
    dataset = stage_dataset(config, tiny_model, toy_dir, "train", Dist())
    kind = {"speech": "audio", "image": "image"}[modality]
    sources = {example.source.split(":")[0] for example in dataset.examples}
    assert sources == {f"{modality}_train.jsonl", "mixed_train.jsonl"}
    assert all(example.kinds == [kind] for example in dataset.examples)


def test_speech_stage1_puts_decoder_states_on_the_llms_embeddings_of_what_whisper_wrote(
    toy_dir: Path, tmp_path: Path
) -> None:
    """speech_states="decoder": stage 1 needs no transcript; each state's token moves onto the
    LLM's embedding of the text Whisper wrote from that state (token_accuracy: a piece of one
    LLM token lands nearest that token's embedding)."""
    from xllm.model.tiny import init_tiny

    model_dir = init_tiny(tmp_path / "model", speech_states="decoder")
    args = stage_args(1, "speech", 40, TOY_ROWS)
    metrics = train(
        model_dir, toy_dir / "speech_train.jsonl", tmp_path / "out", *args, "--lr", "1e-2"
    )
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"] / 2, (first, last)
    accuracy = [m["token_accuracy"] for m in metrics if "token_accuracy" in m]
    assert accuracy[0] < 0.2 and accuracy[-1] > 0.6, accuracy


def test_speech_stage1_refuses_a_frame_stack_over_encoder_frames(
    toy_dir: Path, tmp_path: Path
) -> None:
    from xllm.main import main
    from xllm.model.tiny import init_tiny

    model_dir = init_tiny(tmp_path / "model", speech_interface="frame_stack")
    argv = ["train", "--model", str(model_dir), "--data", str(toy_dir / "speech_train.jsonl")]
    argv += ["--out", str(tmp_path / "out"), *stage_args(1, "speech", 2, 2), "--device", "cpu"]
    assert main(argv) == 2
