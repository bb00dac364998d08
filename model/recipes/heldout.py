"""Held-out evaluation of a model through the HTTP server (`POST /chat`, greedy decoding).

    python -m xllm.model.recipes.heldout --model DIR --data HELDOUT [--voices VOICES] [--n N]

HELDOUT is a folder written by `xllm data toy --seed 999` (any seed the training data did not
use); VOICES a folder with `speech_heldout.jsonl` (utterances in voice variants and speeds that
training never used, from the recipe's data phase). A server is started on a free port unless
--url is given. Figures:

    image      "What is in the image?" (and the other caption questions): the answer names the
               right colour and shape and no other colour or shape
    vqa        "What color is the shape?" / "What shape is it?": the answer names it, nothing else
    video      "Which way does the <shape> move?" / "Where is the shape going?": the direction
    asr        "Transcribe the audio.": word error rate (held-out voices; all voices of the set)
    spoken     a spoken question plus an image ("Answer the spoken question about the image.")
    scene_*    (--scene-images) questions about images of several shapes, by kind
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xllm.model.train.toy import COLORS, DIRECTIONS, SHAPES, manifest_rows

WORDS = {"color": set(COLORS), "shape": set(SHAPES), "direction": set(DIRECTIONS)}


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def names_exactly(answer: str, want: dict[str, str]) -> bool:
    """The answer names each wanted value and no other value of the same kind."""
    found = set(words(answer))
    return all(found & WORDS[kind] == {value} for kind, value in want.items())


def wer_counts(reference: str, hypothesis: str) -> tuple[int, int]:
    from xllm.model.recipes.pretrain import edit_distance

    ref, hyp = words(reference), words(hypothesis)
    return edit_distance(ref, hyp), len(ref)


# Words an answer about a scene may leave out; numbers may be written as digits.
FILLER_WORDS = {"a", "an", "the", "in", "on", "at", "of", "is", "it", "there", "are", "its"}
DIGITS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six"}
# The question kinds of `xllm data scenes` image conversations, by their first words.
SCENE_QUESTIONS = {
    "how many": "count",
    "where is": "position",
    "what color": "color",
    "what shape": "shape",
    "what is at": "what_is_at",
    "is the": "size",
}


def says_all_of(answer: str, expected: str) -> bool:
    """The answer holds every content word of the expected answer (digits read as words):
    "There are three." for "Three.", "It is in the top left corner." for "In the top left
    corner."."""
    found = {DIGITS.get(w, w) for w in re.sub(r"[^a-z0-9' ]", " ", answer.lower()).split()}
    return set(words(expected)) - FILLER_WORDS <= found


def scene_question_kind(question: str) -> str | None:
    text = " ".join(words(re.sub(r"<(image|audio|video)>", " ", question)))
    return next((kind for start, kind in SCENE_QUESTIONS.items() if text.startswith(start)), None)


def scene_of(text: str) -> dict[str, str]:
    found = {}
    for kind, values in WORDS.items():
        hit = [w for w in words(text) if w in values]
        if hit:
            found[kind] = hit[0]
    return found


class Client:
    def __init__(self, url: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)

    def chat(self, prompt: str, files: list[tuple[str, Path]], max_tokens: int = 24) -> str:
        handles = [(kind, (p.name, p.read_bytes())) for kind, p in files]
        data = {"prompt": prompt, "temperature": "0", "max_tokens": str(max_tokens)}
        reply = self.http.post("/chat", data=data, files=handles)
        reply.raise_for_status()
        return reply.json()["text"]


class LocalClient:
    """The same questions asked in-process (greedy), for tests without a server."""

    def __init__(self, model_dir: Path) -> None:
        from xllm.model.checkpoint import load_model

        self.model = load_model(model_dir, device="cpu")

    def chat(self, prompt: str, files: list[tuple[str, Path]], max_tokens: int = 24) -> str:
        import torch

        from xllm.model.generate import generate
        from xllm.model.sampling import SamplingParams

        model = self.model
        prepared = [model.preparer.prepare_file(path, kind) for kind, path in files]
        with torch.inference_mode():
            embeds = model.prompt_embeddings([("user", prompt)], prepared).embeds
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return "".join(d.text for d in generate(model.llm, model.tokenizer, embeds, params))


def word_f1(a: str, b: str) -> float:
    """Word-overlap F1 of two answers (bags of words, case and punctuation ignored)."""
    from collections import Counter

    wa, wb = Counter(words(a)), Counter(words(b))
    common = sum((wa & wb).values())
    if not common:
        return 0.0
    precision, recall = common / sum(wa.values()), common / sum(wb.values())
    return 2 * precision * recall / (precision + recall)


AGREEMENT_F1 = 0.5  # a spoken question's answer "agrees" with the typed one at this word F1


def evaluate(
    client: Client,
    data: Path,
    voices: Path | None,
    n: int,
    scenes: Path | None = None,
    concurrency: int = 8,
    scene_images: Path | None = None,
) -> dict[str, Any]:
    """Every task's questions, asked `concurrency` at a time (the server batches them).

    `data`: an `xllm data toy` folder (images, videos, speech, spoken questions about images);
    `voices`: a folder with `speech_heldout.jsonl`; `scenes`: an `xllm data scenes --heldout`
    folder (held-out sentences in held-out voices: WER; spoken general questions: agreement of
    the spoken question's answer with the typed question's, word F1 >= AGREEMENT_F1);
    `scene_images`: an `xllm data scenes` image manifest (several shapes per image): its
    questions by kind (count, position, size, colour, shape, what is at a place), the answer
    holding every content word of the expected one.
    """
    from concurrent.futures import ThreadPoolExecutor

    results: dict[str, Any] = {}
    examples: dict[str, list] = {}
    # (task, prompt, files, max_tokens, score(answer) -> bool | (errors, words))
    jobs: list[tuple[str, str, list[tuple[str, Path]], int, Any]] = []

    def note(task: str, ok: bool, prompt: str, answer: str) -> None:
        results.setdefault(task, []).append(ok)
        if len(examples.setdefault(task, [])) < 4:
            examples[task].append({"prompt": prompt, "answer": answer, "ok": ok})

    captions = ("What is in the image?", "Describe the image.", "What do you see?")
    for i, row in enumerate(manifest_rows(data / "image_train.jsonl")[:n]):
        image = data / row["image"]
        if "text" not in row:  # a question row: the scene is in the image's other rows' words
            continue
        scene = scene_of(row["text"])
        files = [("image", image)]
        jobs.append(
            (
                "image_color_shape",
                captions[i % 3],
                files,
                24,
                lambda a, s=scene: names_exactly(a, s),
            )
        )
        if i % 2 == 0:
            want = {"color": scene["color"]}
            job = ("image_color", "What color is the shape?", files, 24)
        else:
            want = {"shape": scene["shape"]}
            job = ("image_shape", "What shape is it?", files, 24)
        jobs.append((*job, lambda a, w=want: names_exactly(a, w)))
    for i, row in enumerate(manifest_rows(data / "video_train.jsonl")[:n]):
        if "text" in row:
            scene = scene_of(row["text"])
        else:
            scene = scene_of(
                row["conversations"][0]["content"] + row["conversations"][1]["content"]
            )
        shape = scene.get("shape", "shape")
        prompt = (f"Which way does the {shape} move?", "Where is the shape going?")[i % 2]
        want = {"direction": scene["direction"]}
        files = [("video", data / row["video"])]
        jobs.append(("video_direction", prompt, files, 24, lambda a, w=want: names_exactly(a, w)))
    asr_sets = [("asr_toy_voices", data / "speech_train.jsonl")]
    if voices is not None:
        asr_sets.insert(0, ("asr_heldout_voices", voices / "speech_heldout.jsonl"))
    if scenes is not None:
        asr_sets.insert(0, ("asr_heldout_sentences", scenes / "speech_heldout.jsonl"))
    for task, manifest in asr_sets:
        for row in manifest_rows(manifest)[:n]:
            files = [("audio", manifest.parent / row["audio"])]
            score = lambda a, t=row["text"]: wer_counts(t, a)  # noqa: E731
            jobs.append((task, "Transcribe the audio.", files, 64, score))
    spoken = [
        r for r in manifest_rows(data / "mixed_train.jsonl") if "image" in r and "audio" in r
    ][:n]
    for row in spoken:
        scene = scene_of(row["conversations"][-1]["content"])
        prompt = "Answer the spoken question about the image."
        files = [("image", data / row["image"]), ("audio", data / row["audio"])]
        jobs.append(("spoken_question", prompt, files, 24, lambda a, s=scene: names_exactly(a, s)))
    for row in manifest_rows(scene_images) if scene_images is not None else []:
        if "conversations" not in row:
            continue
        question, expected = (t["content"] for t in row["conversations"][:2])
        question = question.replace("<image>", "").strip()
        kind = scene_question_kind(question)
        if kind is None:  # descriptions: long, scored by none of these rules
            continue
        files = [("image", scene_images.parent / row["image"])]
        score = lambda a, e=expected: says_all_of(a, e)  # noqa: E731
        jobs.append((f"scene_{kind}", question, files, 24, score))
    typed: dict[str, str] = {}
    spoken_general = (
        manifest_rows(scenes / "spoken_heldout.jsonl")[:n] if scenes is not None else []
    )
    for row in spoken_general:  # the typed answers first: the spoken ones are scored on them
        jobs.append(
            ("typed", row["typed"], [], 96, lambda a, q=row["typed"]: typed.setdefault(q, a))
        )

    def ask(job: tuple) -> str:
        _, prompt, files, max_tokens, _ = job
        return client.chat(prompt, files, max_tokens)

    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(ask, jobs))
        for job, answer in zip(jobs, answers, strict=True):
            task, prompt, _, _, score = job
            outcome = score(answer)
            if task == "typed":
                continue
            if isinstance(outcome, tuple):  # WER counts of an ASR task
                errors, total = results.setdefault(task + "_counts", [0, 0])
                results[task + "_counts"] = [errors + outcome[0], total + outcome[1]]
                note(task + "_exact", outcome[0] == 0, prompt, answer)
            else:
                note(task, outcome, prompt, answer)
        voiced = [
            ("spoken_vs_typed", "<audio>", [("audio", scenes / r["audio"])], 96, r["typed"])
            for r in spoken_general
            if scenes is not None
        ]
        for (task, _, _, _, question), answer in zip(voiced, pool.map(ask, voiced), strict=True):
            agree = word_f1(answer, typed[question]) >= AGREEMENT_F1
            note(task, agree, question, f"{answer!r} (typed: {typed[question]!r})")
            note(task + "_exact", answer.strip() == typed[question].strip(), question, answer)
    for task in [k for k in results if k.endswith("_counts")]:
        errors, total = results.pop(task)
        results[task.removesuffix("_counts") + "_wer"] = errors / max(1, total)
    summary = {
        k: (sum(v) / len(v) if isinstance(v, list) else v) for k, v in sorted(results.items())
    }
    summary["counts"] = {k: len(v) for k, v in results.items() if isinstance(v, list)}
    summary["examples"] = examples
    return summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path | None, log_file: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "xllm", "serve", "--port", str(port)]
    if model is not None:
        command += ["--model", str(model)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sink = log_file.open("a")
    process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"xllm serve exited; see {log_file}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.terminate()
    raise RuntimeError("xllm serve did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xllm.model.recipes.heldout")
    parser.add_argument("--model", type=Path, default=None, help="default: the packaged model")
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    parser.add_argument("--data", type=Path, required=True, help="`xllm data toy --seed 999` dir")
    parser.add_argument("--voices", type=Path, default=None, help="held-out voices folder")
    parser.add_argument(
        "--scenes", type=Path, default=None, help="`xllm data scenes --heldout N` folder"
    )
    parser.add_argument(
        "--scene-images",
        type=Path,
        default=None,
        help="an `xllm data scenes` image manifest (.jsonl): counts, positions, sizes",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="questions asked at once")
    parser.add_argument("--n", type=int, default=100, help="items per task")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = parser.parse_args(argv)
    process = None
    url = args.url
    if url is None:
        log_file = Path(args.out or "heldout").with_suffix(".server.log")
        process, url = start_server(args.model, log_file)
    try:
        start = time.time()
        summary = evaluate(
            Client(url),
            args.data,
            args.voices,
            args.n,
            args.scenes,
            args.concurrency,
            args.scene_images,
        )
        summary["seconds"] = round(time.time() - start, 1)
        summary["model"] = str(args.model or "packaged default")
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    text = json.dumps(summary, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
