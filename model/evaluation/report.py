"""Reports: the JSON (as `run` returns it), a Markdown rendering, and the files of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from xllm.model.evaluation.harness import task_results


def _pct(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{100 * value:.{digits}f}"


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _signed_pct(value: Any) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}"


def headline(result: dict[str, Any]) -> str:
    """The task's main numbers in one cell."""
    task = result["task"]
    if not result.get("rows"):
        return "no rows scored"
    if task == "asr":
        line = (
            f"WER {_pct(result['wer'])}% · CER {_pct(result['cer'])}% "
            f"({result['normalizer']} normaliser)"
        )
        if "transcriptions" in result:  # --compare-transcriptions
            line += f"; /v1/audio/transcriptions WER {_pct(result['transcriptions']['wer'])}%"
            long = result.get("long_clip", {})
            if "wer" in long:
                line += (
                    f", a {_num(long['seconds'])} s recording of {long['clips']} clips: "
                    f"{long['segments']} segments, WER {_pct(long['wer'])}%"
                )
        return line
    if task == "masr":
        return (
            f"WER {_pct(result['wer'])}% with image, {_pct(result['wer_without_image'])}% "
            f"without ({_signed_pct(result['wer_delta'])} points); CER "
            f"{_pct(result['cer'])}% / {_pct(result['cer_without_image'])}% "
            f"({_signed_pct(result['cer_delta'])})"
        )
    if task == "relative-score":
        return (
            f"relative score {_num(result['relative_score'])}% "
            f"(candidate {_num(result['candidate_mean'], 2)} / reference "
            f"{_num(result['reference_mean'], 2)}); unparseable reviews "
            f"{result['unparseable']['count']}"
        )
    return (
        f"keyword accuracy {_pct(result['keyword_accuracy'], 1)}% · strict "
        f"{_pct(result['keyword_accuracy_strict'], 1)}% · exact match "
        f"{_pct(result['exact_match'], 1)}%"
    )


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    results = task_results(report)
    first = next(iter(results.values()))
    target = first.get("url") or first.get("model") or "?"
    lines = [f"# xllm eval: {target}", ""]
    lines.append(f"Created {report.get('created', '?')}.")
    lines.append("")
    lines += [
        "| task | data | rows | failed | skipped | result |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for task, result in results.items():
        lines.append(
            f"| {task} | {_escape(Path(result['data']).name)} | {result['rows']} | "
            f"{result['failed']['count']} | {result['skipped']} | {_escape(headline(result))} |"
        )
    for task, why in report.get("left_out", {}).items():
        lines.append(f"| {task} | - | - | - | - | not run: {_escape(why)} |")
    for task, result in results.items():
        if task == "relative-score" and result.get("rows"):
            lines += ["", "## relative-score by category", ""]
            lines += [
                "| category | n | reference mean | candidate mean | relative score % |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for name, row in result["categories"].items():
                lines.append(
                    f"| {name} | {row['n']} | {_num(row['reference_mean'], 2)} | "
                    f"{_num(row['candidate_mean'], 2)} | {_num(row['relative_score'])} |"
                )
            judge = result["judge"]
            lines += [
                "",
                f"Judge `{judge['model']}` at {judge['url'] or '(cache only)'}: "
                f"{judge['calls']} calls, {judge['cache_hits']} cached reviews.",
            ]
            bad = result["unparseable"]
            if bad["count"]:
                ids = ", ".join(bad["ids"][:20]) + (" …" if bad["count"] > 20 else "")
                lines.append(f"Unparseable reviews (left out): {bad['count']}: {ids}.")
            if result["judge_failed"]["count"]:
                ids = ", ".join(result["judge_failed"]["ids"][:20])
                lines.append(
                    f"Judge failures (left out): {result['judge_failed']['count']}: {ids}."
                )
        reviewed = set(result.get("unparseable", {}).get("ids", []))
        reviewed |= set(result.get("judge_failed", {}).get("ids", []))
        unanswered = [i for i in result["failed"]["ids"] if i not in reviewed]
        if unanswered:
            error = result["failed"]["first_error"]
            lines += [
                "",
                f"{task}: {len(unanswered)} row(s) left out, not answered: "
                + ", ".join(unanswered[:20])
                + (f" (first error: {_escape(error)})" if error else ""),
            ]
    published = report.get("published") or []
    if published:
        lines += [
            "",
            "## Published figures (other systems, on their own benchmark data)",
            "",
            "These are not measurements of this model: they come from the cited papers and "
            "model cards, measured on the named benchmark with each system's own decoding and "
            "text normalisation. A number above compares with them only if it was measured on "
            "the same benchmark split with the same protocol; the toy pack's never does. "
            "≈ marks figures that vary between sources.",
            "",
            "| benchmark | system | metric | value | notes | source |",
            "| --- | --- | --- | ---: | --- | --- |",
        ]
        for fig in published:
            value = ("≈ " if fig["approx"] else "") + fig["value"]
            lines.append(
                f"| {_escape(fig['benchmark'])} | {_escape(fig['system'])} | {fig['metric']} | "
                f"{value} | {_escape(fig['note'])} | {_escape(fig['source'])} |"
            )
    return "\n".join(lines) + "\n"


def write_report(
    report: dict[str, Any], predictions: list[dict[str, Any]], out: Path
) -> dict[str, Path]:
    """OUT.json, OUT.md and OUT.predictions.jsonl (for an `out` of OUT.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    paths = {
        "json": out if out.suffix == ".json" else stem.with_name(stem.name + ".json"),
        "markdown": stem.with_name(stem.name + ".md"),
        "predictions": stem.with_name(stem.name + ".predictions.jsonl"),
    }
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(to_markdown(report))
    with paths["predictions"].open("w", encoding="utf-8") as fh:
        for row in predictions:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths
