"""`python -m xllm.train ...`: `xllm train` as a module, which is what torchrun launches.

torchrun --nproc_per_node 8 -m xllm.train --stage 2 --modality image --model M --data D --out O
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from xllm.main import user_error_types
    from xllm.model.train.cli import add_train_arguments, run_train

    parser = argparse.ArgumentParser(
        prog="python -m xllm.train", description="Train X-LLM's interfaces (same as `xllm train`)."
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, user_error_types()):
            print(f"xllm train: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
