"""Small reporting helpers shared by the scripts: `--help`'s format, a progress bar, confidence
intervals, McNemar's exact test, JSONL reading and atomic writing."""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout (its usage examples) and shows every flag's default."""


def progress(items, total=None, desc=""):
    """Yield items while drawing a one-line progress bar on stderr (rank 0 only under torchrun)."""
    total = total if total is not None else len(items)
    if os.environ.get("RANK", "0") != "0":
        yield from items
        return
    start = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        done = i + 1
        elapsed = time.perf_counter() - start
        bar = "#" * int(30 * done / max(total, 1))
        eta = elapsed / done * (total - done)
        print(f"\r{desc} [{bar:<30}] {done}/{total} {elapsed:.0f}s eta {eta:.0f}s", end="", file=sys.stderr)
    print(file=sys.stderr)


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval for k successes out of n, as fractions."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a, only_b):
    """Two-sided exact McNemar p-value: a binomial(n, 1/2) test on the discordant pairs."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def write_jsonl(path, rows):
    """Write rows to path through a temp file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def read_jsonl(path):
    """[(where, row)] of a JSONL file, where = "path:line" for error messages; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{i + 1}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
    return rows
