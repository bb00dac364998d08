"""`python -m xllm.train ...`: `xllm train` as a module, which is what torchrun launches.

torchrun --nproc_per_node 8 -m xllm.train --stage 2 --modality image --model M --data D --out O
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from xllm.main import run_command
    from xllm.model.train.cli import add_train_arguments, run_train

    parser = argparse.ArgumentParser(
        prog="python -m xllm.train", description="Train X-LLM's interfaces (same as `xllm train`)."
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("train", lambda: run_train(args))


if __name__ == "__main__":
    raise SystemExit(main())
