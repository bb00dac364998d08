#!/usr/bin/env python3
"""Summarise a py-spy raw profile per thread: the share of each thread's samples under a function.

py-spy record -p SERVER_PID -d 10 -r 250 -f raw -o prof.txt --threads --nonblocking
python bench/pyspy_summary.py prof.txt --top 30
"""

from __future__ import annotations

import argparse
import collections


def frame_name(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=25, help="functions shown per thread")
    parser.add_argument("--threads", type=int, default=3, help="threads shown")
    args = parser.parse_args(argv)
    per_thread: collections.Counter[str] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(args.profile) as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            thread, n = frames[0], int(count)
            per_thread[thread] += n
            for name in {frame_name(f) for f in frames[1:]}:
                inclusive[thread][name] += n
    total = sum(per_thread.values())
    for thread, n in per_thread.most_common(args.threads):
        print(f"== {thread}: {n} samples ({100 * n / total:.0f}% of all)")
        for name, m in inclusive[thread].most_common(args.top):
            print(f"  {100 * m / n:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
