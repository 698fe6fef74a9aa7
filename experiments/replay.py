"""The study's `replay` control (docs/study.md): an ARKD run's mean schedule a / (a + b), one alpha a
step, replayed by arkd.py unchanged. This module adds the strategy to losses.py's tables, which
arkd.py reads, then runs arkd.main.

    python -m experiments.replay ARKD_RUN/metrics.jsonl ARKD_FLAGS...       # arkd.py --strategy replay
"""
import json
import sys

import arkd
import losses
from experiments import cli


def read_alpha_schedule(path):
    """The mean alpha a / (a + b) of an ARKD run's policy at each step, from its metrics.jsonl."""
    rows = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {number}: not JSON") from None
            if row.get("beta_a") and row.get("beta_b"):
                rows[row["step"]] = row["beta_a"] / (row["beta_a"] + row["beta_b"])
    if not rows:
        raise ValueError(f"{path} has no ARKD policy rows (beta_a, beta_b)")
    return [rows[k] for k in sorted(rows)]


def add_replay(schedule):
    """`replay` becomes a strategy: step k of K takes schedule[round(k / (K - 1) (n - 1))] (a schedule of
    another length is stretched)."""
    losses.STRATEGY_ARITY["replay"] = 0
    losses.STEP_RULES["replay"] = lambda numbers, progress, stats: schedule[round(progress * (len(schedule) - 1))]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise ValueError("usage: python -m experiments.replay ARKD_RUN/metrics.jsonl ARKD_FLAGS...")
    add_replay(read_alpha_schedule(argv[0]))
    return arkd.main(argv[1:] + ["--strategy", "replay"])


if __name__ == "__main__":
    cli(main, "replay")
