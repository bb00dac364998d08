"""Published figures of X-LLM and other systems, for the comparison table of a report.

These are other systems' numbers on their own benchmark data, decoding settings and text
normalisers, copied from their papers or model cards. They compare with a number of ours only
when ours was measured on the same benchmark split with the same protocol; never with the toy
pack. `approx` marks figures that vary between sources (normalisers, evaluation harnesses) or
that we could not check against the primary source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Figure:
    task: str  # our task the figure relates to
    benchmark: str
    system: str
    metric: str
    value: str
    source: str
    note: str = ""
    approx: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


PUBLISHED: tuple[Figure, ...] = (
    # --- LLaVA-Bench (COCO): 90 questions on 30 COCO val2014 images, relative score %
    Figure(
        "relative-score",
        "LLaVA-Bench (COCO), all 90",
        "X-LLM",
        "relative score %",
        "84.5",
        "Chen et al. 2023, X-LLM, arXiv:2305.04160",
        "judge ChatGPT (not GPT-4); answers translated zh->en",
    ),
    Figure(
        "relative-score",
        "LLaVA-Bench (COCO), all 90",
        "LLaVA-13B",
        "relative score %",
        "85.1",
        "Liu et al. 2023, LLaVA, arXiv:2304.08485 (Table 4, full data)",
        "judge GPT-4; by category: conversation 83.1, detail 75.3, complex 96.5",
    ),
    # --- LibriSpeech, WER % (test-clean / test-other)
    Figure(
        "asr",
        "LibriSpeech test-clean / test-other",
        "Whisper large-v3",
        "WER %",
        "2.0 / 3.9",
        "openai/whisper-large-v3 on the Hugging Face Open ASR Leaderboard",
        "zero-shot; other harnesses report 1.5-2.0 / 3.9-4.0 depending on the normaliser",
        approx=True,
    ),
    Figure(
        "asr",
        "LibriSpeech test-clean / test-other",
        "Whisper large-v2",
        "WER %",
        "2.7 / 5.2",
        "Radford et al. 2022, Whisper, arXiv:2212.04356",
        "zero-shot, Whisper's English normaliser",
        approx=True,
    ),
    Figure(
        "asr",
        "LibriSpeech test-clean / test-other",
        "SLAM-ASR",
        "WER %",
        "1.84 / 3.39",
        "Ma et al. 2024, arXiv:2402.08846",
        "speech encoder + linear projector + LLM, trained on LibriSpeech-960",
    ),
    Figure(
        "asr",
        "LibriSpeech test-clean / test-other",
        "Qwen2-Audio",
        "WER %",
        "1.6 / 3.6",
        "Chu et al. 2024, Qwen2-Audio, arXiv:2407.10759",
    ),
    Figure(
        "asr",
        "LibriSpeech test-clean / test-other",
        "Qwen-Audio",
        "WER %",
        "2.0 / 4.2",
        "Chu et al. 2023, Qwen-Audio, arXiv:2311.07919",
        approx=True,
    ),
    # --- AISHELL-2, CER %
    Figure(
        "asr",
        "AISHELL-2 test (Mic / iOS / Android)",
        "Qwen-Audio",
        "CER %",
        "3.3 / 3.1 / 3.3",
        "Chu et al. 2023, Qwen-Audio, arXiv:2311.07919",
        approx=True,
    ),
    Figure(
        "asr",
        "AISHELL-2 test (Mic / iOS / Android)",
        "Qwen2-Audio",
        "CER %",
        "3.0 / 3.0 / 2.9",
        "Qwen2-Audio evaluation table (QwenLM/Qwen2-Audio README)",
        approx=True,
    ),
    Figure(
        "asr",
        "AISHELL-2 test_ios",
        "X-LLM",
        "CER %",
        "-",
        "Chen et al. 2023, X-LLM, arXiv:2305.04160",
        "X-LLM evaluated ASR on AISHELL-2 test_ios (CER, beam 5) with its unreleased speech "
        "encoder; see the paper for the figure",
    ),
)


def figures_for(tasks: list[str]) -> list[Figure]:
    wanted = set(tasks) | ({"asr"} if "masr" in tasks else set())
    return [f for f in PUBLISHED if f.task in wanted]
