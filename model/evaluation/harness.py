"""Running tasks against a backend: queries out, answers in, metrics and per-row predictions.

`run(backend, data, tasks, options, judge)` is what `xllm eval` calls. `data` is a manifest or a
pack folder (`xllm eval pack`), in which task T reads `T.jsonl`. The report of one task is a flat
dict (task, target, data, rows, skipped, errors, the metrics, examples); a run of several tasks
nests them under "tasks". Both carry the published figures that relate to the tasks.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xllm.model.evaluation.backends import Answer, Backend, Query
from xllm.model.evaluation.judge import (
    JudgeClient,
    ReviewParseError,
    parse_review,
    review_content,
    rule_for,
)
from xllm.model.evaluation.long_clip import long_clip_result
from xllm.model.evaluation.metrics import ReviewScore, relative_scores
from xllm.model.evaluation.published import figures_for
from xllm.model.evaluation.tasks import (
    DEFAULT_MAX_TOKENS,
    TASKS,
    EvalError,
    Item,
    build_items,
    read_rows,
    score_items,
)

SHOWN_EXAMPLES = 5
SHOWN_IDS = 50
REPORT_VERSION = 1


@dataclass
class EvalOptions:
    limit: int | None = None
    max_tokens: int | None = None  # None: the task's default
    normalizer: str = "auto"
    numbers: str = "words"
    language: str = "en"  # instruction language for text rows (en, zh)
    progress: bool = True
    judge_rules: dict[str, str] | None = None  # a loaded LLaVA rule.json
    # asr: each clip also through the server's /v1/audio/transcriptions, scored beside chat's
    transcriptions: bool = False


def manifest_for(data: Path, task: str) -> Path:
    """The manifest a task reads: `data` itself, or `data/<task>.jsonl` for a pack folder."""
    if data.is_dir():
        path = data / f"{task}.jsonl"
        if not path.is_file():
            raise EvalError(f"{data} has no {task}.jsonl (make a pack with `xllm eval pack`)")
        return path
    if not data.is_file():
        raise EvalError(f"data not found: {data}")
    return data


def resolve_tasks(spec: list[str], data: Path, judge: bool) -> tuple[list[str], dict[str, str]]:
    """The tasks to run: `all` means every task the pack folder has a manifest for, leaving out
    relative-score when there is no judge; returns (tasks, {task: why it was left out})."""
    if "all" not in spec:
        return list(dict.fromkeys(spec)), {}
    if not data.is_dir():
        raise EvalError("--task all needs a pack folder as --data (see `xllm eval pack`)")
    tasks, left_out = [], {}
    for task in TASKS:
        if not (data / f"{task}.jsonl").is_file():
            continue
        if task == "relative-score" and not judge:
            left_out[task] = "no judge (--judge-url)"
            continue
        tasks.append(task)
    if not tasks:
        raise EvalError(f"{data} holds no task manifests")
    return tasks, left_out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="q", file=sys.stderr, disable=not enabled, dynamic_ncols=True
    )


def _ask(
    backend: Backend, items: list[Item], max_tokens: int, task: str, progress: bool
) -> list[dict[str, Answer]]:
    """Every query of every item answered, grouped back per item."""
    keys = [(i, cond) for i, item in enumerate(items) for cond in item.queries]
    queries: list[Query] = [items[i].queries[cond] for i, cond in keys]
    with _progress(len(queries), task, progress) as bar:
        answers = backend.answer_all(queries, max_tokens, on_done=lambda: bar.update(1))
    grouped: list[dict[str, Answer]] = [{} for _ in items]
    for (i, cond), answer in zip(keys, answers, strict=True):
        grouped[i][cond] = answer
    return grouped


def run_task(
    backend: Backend,
    task: str,
    manifest: Path,
    options: EvalOptions,
    judge: JudgeClient | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the task's result, its per-row predictions)."""
    if task == "relative-score" and judge is None:
        raise EvalError("relative-score needs a judge: give --judge-url (and --judge-model)")
    started = time.monotonic()
    rows, skipped = read_rows(manifest)
    items, unfit = build_items(task, rows, options.language, options.limit)
    if not items:
        raise EvalError(f"{manifest}: no rows fit the {task} task")
    max_tokens = options.max_tokens or DEFAULT_MAX_TOKENS[task]
    if options.transcriptions and task == "asr":
        for item in items:
            item.queries["transcriptions"] = replace(
                item.queries["answer"], endpoint="transcriptions"
            )
    answers = _ask(backend, items, max_tokens, task, options.progress)

    predictions = [
        {
            "task": task,
            "id": item.id,
            "reference": item.reference,
            "answers": {cond: a.text for cond, a in answer.items()},
            **(
                {"error": "; ".join(a.error for a in answer.values() if a.error)}
                if any(a.error for a in answer.values())
                else {}
            ),
        }
        for item, answer in zip(items, answers, strict=True)
    ]
    if task == "relative-score":
        assert judge is not None
        metrics, failed = _relative_score(items, answers, predictions, judge, options)
    else:
        metrics, failed = score_items(task, items, answers, options.normalizer, options.numbers)
    if options.transcriptions and task == "asr":
        answered = [item for i, item in enumerate(items) if i not in set(failed)]
        clips = [(item.reference, item.queries["answer"].media[0][1]) for item in answered]
        metrics["long_clip"] = long_clip_result(backend, clips, options.normalizer, options.numbers)

    failed_ids = [items[i].id for i in failed]
    scored = len(items) - len(failed)
    result: dict[str, Any] = {
        "task": task,
        **backend.info,
        "data": str(manifest),
        "rows": scored,
        "skipped": sum(skipped.values()) + unfit,
        "skip_reasons": dict(sorted((skipped + Counter({"does not fit the task": unfit})).items())),
        # rows left out of the metrics: no answer (media or server error), or for
        # relative-score no usable review (also listed under unparseable / judge_failed)
        "failed": {
            "count": len(failed_ids),
            "ids": failed_ids[:SHOWN_IDS],
            "first_error": next((p["error"] for p in predictions if "error" in p), None),
        },
        "max_tokens": max_tokens,
        **metrics,
    }
    result["examples"] = [
        {"id": p["id"], "reference": p["reference"], **_shown_answers(p["answers"])}
        for p in predictions
        if "error" not in p
    ][:SHOWN_EXAMPLES]
    result["seconds"] = round(time.monotonic() - started, 2)
    return result, predictions


def _shown_answers(answers: dict[str, str | None]) -> dict[str, Any]:
    return {"answer": answers["answer"]} if set(answers) == {"answer"} else {"answers": answers}


def _relative_score(
    items: list[Item],
    answers: list[dict[str, Answer]],
    predictions: list[dict[str, Any]],
    judge: JudgeClient,
    options: EvalOptions,
) -> tuple[dict[str, Any], list[int]]:
    failed = {i for i, a in enumerate(answers) if a["answer"].text is None}
    asked = [i for i in range(len(items)) if i not in failed]
    contents = []
    for i in asked:
        item = items[i]
        rule = rule_for(item.extra["category"], bool(item.extra["boxes"]), options.judge_rules)
        contents.append(
            review_content(
                item.extra["question"],
                item.reference,
                answers[i]["answer"].text or "",
                item.extra["context"],
                item.extra["boxes"],
                rule,
            )
        )
    calls_before, hits_before = judge.calls, judge.cache_hits
    with _progress(len(contents), "judge", options.progress) as bar:
        replies = judge.review_all(contents, on_done=lambda: bar.update(1))
    scores: list[ReviewScore] = []
    unparseable: list[dict[str, str]] = []
    judge_failed: list[dict[str, str]] = []
    for i, reply in zip(asked, replies, strict=True):
        item, prediction = items[i], predictions[i]
        prediction["category"] = item.extra["category"]
        prediction["review"] = reply.text
        if reply.text is None:
            judge_failed.append({"id": item.id, "error": reply.error or "no reply"})
            prediction["judge_error"] = reply.error
            failed.add(i)
            continue
        try:
            reference, candidate = parse_review(reply.text)
        except ReviewParseError as exc:
            unparseable.append({"id": item.id, "reason": str(exc)})
            prediction["review_error"] = str(exc)
            failed.add(i)
            continue
        prediction["scores"] = [reference, candidate]
        scores.append(ReviewScore(item.id, item.extra["category"], reference, candidate))
    categories = relative_scores(scores)
    overall = categories.get("all", {})
    metrics = {
        "relative_score": overall.get("relative_score"),
        "reference_mean": overall.get("reference_mean"),
        "candidate_mean": overall.get("candidate_mean"),
        "reviewed": len(scores),
        "categories": categories,
        "unparseable": {
            "count": len(unparseable),
            "ids": [u["id"] for u in unparseable],
            "reasons": unparseable[:SHOWN_IDS],
        },
        "judge_failed": {
            "count": len(judge_failed),
            "ids": [f["id"] for f in judge_failed],
            "errors": judge_failed[:SHOWN_IDS],
        },
        "judge": {
            "url": judge.url,
            "model": judge.model,
            "temperature": judge.temperature,
            "calls": judge.calls - calls_before,
            "cache_hits": judge.cache_hits - hits_before,
            "cache": str(judge.cache_dir) if judge.cache_dir else None,
        },
    }
    # rows left out of the score: the candidate failed, or the review is unusable
    return metrics, sorted(failed)


def run(
    backend: Backend,
    data: Path,
    tasks: list[str],
    options: EvalOptions,
    judge: JudgeClient | None = None,
    left_out: dict[str, str] | None = None,
    on_task: Callable[[str, dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every task on its manifest -> (the report, all predictions)."""
    results: dict[str, dict[str, Any]] = {}
    predictions: list[dict[str, Any]] = []
    for task in tasks:
        result, rows = run_task(backend, task, manifest_for(data, task), options, judge)
        results[task] = result
        predictions += rows
        if on_task:
            on_task(task, result)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    published = [f.as_dict() for f in figures_for(tasks)]
    if len(tasks) == 1 and not left_out:
        return {**results[tasks[0]], "created": created, "published": published}, predictions
    report = {
        "report": "xllm-eval",
        "version": REPORT_VERSION,
        "created": created,
        "target": backend.info,
        "data": str(data),
        "tasks": results,
        "left_out": left_out or {},
        "published": published,
    }
    return report, predictions


def task_results(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-task results of a report, whether it holds one task or several."""
    return report["tasks"] if "tasks" in report else {report["task"]: report}
