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


def test_the_llamacpp_backend_settles_device_dtype_and_quantization():
    def settings(*flags: str) -> Settings:
        return settings_from_args(build_parser().parse_args(["serve", *flags]))

    chosen = settings("--llm-backend", "llamacpp", "--quantize", "int8")
    assert (chosen.device, chosen.dtype, chosen.torch_quantize) == ("cpu", "bfloat16", "none")
    config = chosen.engine_config()
    assert (config.llm_backend, config.llamacpp_quantize) == ("llamacpp", "int8")
    exact = settings("--llm-backend", "llamacpp", "--dtype", "float32")
    assert exact.dtype == "float32" and exact.engine_config().llamacpp_quantize == "none"
    plain = settings("--quantize", "int8")  # PyTorch quantizes where it runs the LLM
    assert (plain.dtype, plain.torch_quantize) == ("auto", "int8")
    assert plain.engine_config().llamacpp_quantize == "none"
    for wrong, message in (("--device", "cuda"), "CPU"), (("--quantize", "nf4"), "none or int8"):
        with pytest.raises(UserError, match=message):
            settings("--llm-backend", "llamacpp", *wrong)
