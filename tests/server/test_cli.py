"""`xllm serve`'s flags are generated from Settings: one per field, with its type and choices."""

from __future__ import annotations

import argparse
import typing

import pytest

from xllm.main import UserError, build_parser
from xllm.server.cli import flag_name, settings_from_args
from xllm.server.settings import Settings


def serve_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    return {a.option_strings[0]: a for a in serve._actions if a.option_strings[0] != "-h"}


def test_every_setting_has_its_flag_and_nothing_else_does():
    actions = serve_actions()
    assert set(actions) == {flag_name(name) for name in Settings.model_fields}
    assert actions["--engine"].choices == ("process", "thread")
    assert actions["--compile"].choices == ("on", "off")
    quantize = Settings.model_fields["quantize"].annotation
    assert actions["--quantize"].choices == typing.get_args(quantize)
    assert actions["--max-batch"].type is int and "(default 32)" in actions["--max-batch"].help
    assert all(action.default is None for action in actions.values())  # env vars stay in force


def test_flags_become_settings_and_bad_values_are_user_errors(monkeypatch):
    monkeypatch.setenv("XLLM_MAX_QUEUE", "7")
    args = build_parser().parse_args(
        ["serve", "--max-batch", "4", "--compile", "off", "--cors-origins", "a,b"]
    )
    settings = settings_from_args(args)
    assert (settings.max_batch, settings.max_queue, settings.compile) == (4, 7, False)
    assert settings.cors_origins == ["a", "b"]
    with pytest.raises(UserError, match="max_batch"):
        settings_from_args(build_parser().parse_args(["serve", "--max-batch", "0"]))
