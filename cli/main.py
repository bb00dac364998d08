"""The `xllm` command: one parser, each subcommand registered by the package that owns it."""

from __future__ import annotations
import sys
def main(argv=None) -> int:
    print("xllm")
    return 0
