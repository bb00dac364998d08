"""The Grafana dashboard, every YAML file (parse + yamllint) and docs/DEPLOYMENT.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.deploy.helpers import (
    DASHBOARD,
    DOCS,
    REPO,
    environment_names,
    exported_series,
    parse_promql,
    promql_metrics,
    yaml_files,
)

# deploy/k8s/hpa.yaml, docker/Dockerfile, ... as the guide names them
REPO_PATH = re.compile(
    r"\b((?:docker|deploy|docs)/[\w./-]+\.(?:yaml|yml|json|md)|docker/Dockerfile)\b"
)


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def panels(dashboard) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def exprs(panel) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_dashboard_queries_parse_and_use_exported_metrics(dashboard):
    pytest.importorskip("promql_parser", reason="pip install promql-parser")
    queries = [e for p in panels(dashboard) for e in exprs(p)]
    queries += [
        v["definition"] for v in dashboard["templating"]["list"] if v.get("type") == "query"
    ]
    assert queries
    for expr in queries:
        if not expr.startswith("label_values("):
            parse_promql(expr)
        unknown = promql_metrics(expr) - exported_series()
        assert not unknown, f"{expr}: not exported: {unknown}"


def test_dashboard_layout(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def find_panel(dashboard, pattern: str) -> dict:
    found = [p for p in panels(dashboard) if re.search(pattern, p["title"], re.IGNORECASE)]
    assert len(found) == 1, f"one panel titled like {pattern!r}: {[p['title'] for p in found]}"
    return found[0]


@pytest.mark.parametrize(
    ("title", "histogram", "by"),
    [
        ("time to first token", "xllm_time_to_first_token_seconds", "le"),
        ("inter-token", "xllm_inter_token_latency_seconds", "le"),
        ("encoder time", "xllm_encoder_seconds", "le, modality"),
    ],
)
def test_latency_panels_show_p50_and_p95(dashboard, title, histogram, by):
    queries = exprs(find_panel(dashboard, title))
    for quantile in ("0.5", "0.95"):
        assert any(
            q.startswith(f"histogram_quantile({quantile}, sum by ({by}) (rate({histogram}_bucket")
            for q in queries
        ), (quantile, queries)


@pytest.mark.parametrize(
    ("title", "needle"),
    [
        ("waiting", "xllm_num_requests_waiting"),
        ("running", "xllm_num_requests_running"),
        ("kv cache", "xllm_kv_cache_usage_ratio"),
        ("tokens per second", "rate(xllm_generated_tokens_total"),
        ("by status", "sum by (status) (rate(xllm_requests_total"),
    ],
)
def test_load_and_throughput_panels(dashboard, title, needle):
    assert any(needle in q for q in exprs(find_panel(dashboard, title)))


# ----------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_yamllint():
    pytest.importorskip("yamllint", reason="pip install yamllint")
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint")]
        + [str(p) for p in yaml_files()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- docs


def test_docs_name_real_settings_and_files():
    text = DOCS.read_text()
    names = set(re.findall(r"\bXLLM_[A-Z0-9_]+\b", text))
    assert names, "the guide shows XLLM_* settings"
    assert not names - environment_names(), names - environment_names()
    paths = set(re.findall(REPO_PATH, text))
    assert paths
    for path in paths:
        assert (REPO / path).exists(), path
