"""Readers for the deployment files (Dockerfile, compose, k8s, dashboards) and what they must
agree with in the package: the `xllm serve` parser, Settings, the exported metrics, the routes."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
K8S = REPO / "deploy" / "k8s"
DASHBOARD = REPO / "deploy" / "grafana" / "xllm-dashboard.json"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
DOCS = REPO / "docs" / "DEPLOYMENT.md"

# After its drain deadline the server still needs a few seconds to exit (server/app.py: aborted
# requests get 5 s to end, then uvicorn's graceful shutdown has 5 s): budget that on top.
SHUTDOWN_SLACK_S = 10


def yaml_files() -> list[Path]:
    """Every YAML file of the deployment: docker/, deploy/ and the yamllint config."""
    found = [p for d in (DOCKER, REPO / "deploy") for p in d.rglob("*") if p.is_file()]
    return [*sorted(p for p in found if p.suffix in (".yaml", ".yml")), REPO / ".yamllint"]


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    (doc,) = load_docs(path)
    return doc


# ----------------------------------------------------------------------------- the package


def serve_parser() -> argparse.ArgumentParser:
    from xllm.main import build_parser

    return build_parser()


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """`xllm <argv>` must be `xllm serve ...` with flags the parser accepts."""
    assert argv[:1] == ["serve"], f"not `xllm serve ...`: {argv}"
    try:
        return serve_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`xllm {shlex.join(argv)}` is rejected by the parser") from exc


def settings_fields() -> dict[str, Any]:
    """XLLM_<FIELD> -> the pydantic field, for every server setting."""
    from xllm.server.settings import Settings

    return {f"XLLM_{name.upper()}": info for name, info in Settings.model_fields.items()}


def environment_names() -> set[str]:
    """Every XLLM_* variable xllm reads: the server settings and the pretrained parts' cache."""
    from xllm.model.pretrained import HOME_ENV, INDEX_ENV, OFFLINE_ENV

    return {*settings_fields(), HOME_ENV, INDEX_ENV, OFFLINE_ENV}


def setting_default(name: str) -> Any:
    return settings_fields()[name].default


@cache
def exported_series() -> frozenset[str]:
    """Names of the series the server's /metrics can expose (counters as *_total, histograms
    as *_bucket/_sum/_count), from the metric families of xllm.server.metrics.Metrics."""
    from xllm.server.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        elif family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        else:
            names.add(family.name)
    return frozenset(names)


XLLM_NAME = re.compile(r"\bxllm_[a-z0-9_]+\b")


def promql_metrics(expr: str) -> set[str]:
    """xllm_* metric names in a PromQL expression (label names in the expression don't start
    with xllm_)."""
    return set(XLLM_NAME.findall(expr))


def parse_promql(expr: str) -> None:
    """Syntax check with promql-parser, after filling in Grafana and prometheus-adapter
    placeholders."""
    import promql_parser

    filled = (
        expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("<<.Series>>", "xllm_series")
        .replace("<<.LabelMatchers>>", 'namespace="xllm",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )
    try:
        promql_parser.parse(filled)
    except ValueError as exc:
        raise AssertionError(f"bad PromQL {expr!r}: {exc}") from None


# ----------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for rest in self.all("ENV"):
            env.update(parse_env_instruction(rest))
        return env


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found


def logical_lines(text: str) -> list[str]:
    """Instructions with continuation lines joined and comment lines dropped."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_env_instruction(rest: str) -> dict[str, str]:
    parts = shlex.split(rest)
    if len(parts) >= 2 and "=" not in parts[0]:  # legacy `ENV NAME value`
        return {parts[0]: " ".join(parts[1:])}
    return dict(part.split("=", 1) for part in parts)


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM: {line}"
            arg, _, default = rest.partition("=")
            global_args[arg] = default if _ else None
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(global_args, stages)


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def split_options(rest: str) -> tuple[dict[str, str], str]:
    """`--a=1 --b=2 CMD ...` -> ({'a': '1', 'b': '2'}, 'CMD ...')."""
    options: dict[str, str] = {}
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    return options, rest


def duration_s(text: str | int | float) -> float:
    """Docker/compose durations: 45s, 1m30s, 1h, 500ms, or plain seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ----------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns(path: Path = REPO / ".dockerignore") -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Whether the context path is left out, with .dockerignore's rules (last match wins, `!`
    re-includes, a matched folder leaves out all below it, `**` matches any depth)."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            rest = pattern[3:]
            hit = any(fnmatch.fnmatchcase(part, rest) for part in parts) or any(
                fnmatch.fnmatchcase(c, rest) for c in candidates
            )
        else:
            hit = any(fnmatch.fnmatchcase(c, pattern) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


# ----------------------------------------------------------------------------- compose


INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?+])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}: VAR from `env`, else the default."""
    env = env or {}

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if name in env:
            return env[name]
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"{match.group(0)} has no default")

    return INTERPOLATION.sub(replace, value)


def compose_env(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}
