"""Behaviour kept: the same short runs of arkd.py in this tree and in an earlier commit's tree give the
same per-step numbers and the same final weights.

Both trees train on the same inputs, written here once: the offline toy task and tiny GPT-2s with
dropout 0 (so nothing random is drawn that a refactor could reorder). Each run is a subprocess in its
own tree. Compared: every number of every metrics.jsonl row (timings and the learning rate's float
aside: timings differ), and every tensor of last/model.safetensors. Exit status 1 on any difference.

    python -m experiments.same_numbers --against d623f57             # every method and strategy
    python -m experiments.same_numbers --against HEAD~3 --runs "kd arkd" "sft -"
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import data
import plumbing
from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("sft -", "seqkd -", "okd fkl", "kd fkl", "kd rkl", "kd fixed:0.3", "kd linear:0.9,0.1", "kd greedy", "kd akl",
        "kd atkd", "kd arkd", "kd jsd:0.5", "kd tvd", "kd skl:0.1", "kd srkl:0.1", "kd arkd --sgo_ratio 0.5")
TIMINGS = ("step_seconds", "tokens_per_second")


def checkout(rev, folder):
    """The files of commit `rev` in `folder` (git archive: no working tree is touched)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise ValueError(f"--against {rev}: not a commit of this repository ({archive.stderr.decode().strip()})")
    os.makedirs(folder)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)


def inputs(folder):
    """The toy data, a teacher (2 x 64) and a student (1 x 32), dropout 0."""
    data.write_synthetic(os.path.join(folder, "data"), tokenizer=True)
    tokenizer = os.path.join(folder, "data", "tokenizer")
    return {role: plumbing.tiny_model(tokenizer, os.path.join(folder, role), n_embd=width, n_layer=layers, seed=seed,
                                      dropout=0.0)
            for role, width, layers, seed in (("teacher", 64, 2, 1), ("student", 32, 1, 2))}


def train(tree, run, models, data_dir, out, steps):
    method, strategy, *flags = run.split()
    argv = [sys.executable, "arkd.py", "--method", method, "--teacher", models["teacher"], "--student",
            models["student"], "--data_dir", data_dir, "--out", out, "--batch_size", "4", "--grad_accum", "2",
            "--max_steps", str(steps), "--lr", "2e-3", "--warmup_ratio", "0.25", "--eval_every", "0", "--val_examples",
            "4", "--max_new_tokens", "4", "--train_examples", "96", "--policy_buffer", "2", *flags]
    argv += ["--strategy", strategy] if strategy != "-" else []
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise ValueError(f"{run} in {tree} failed: {done.stderr[-1500:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def differences(rows, old_rows, weights, old_weights, tol=1e-6):
    """Every number that differs (beyond tol, relative) between two runs' rows and weights, named."""
    found = [f"{len(rows)} rows, {len(old_rows)} before"] if len(rows) != len(old_rows) else []
    for row, old in zip(rows, old_rows):
        for key in sorted(set(row) | set(old)):
            a, b = row.get(key), old.get(key)
            if key in TIMINGS or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=tol,
                                                                                                   abs_tol=tol)):
                continue
            if a != b:
                found.append(f"step {row.get('step')} {key}: {a} (before {b})")
    for name in sorted(set(weights) | set(old_weights)):
        a, b = weights.get(name), old_weights.get(name)
        if a is None or b is None or a.shape != b.shape or float((a - b).abs().max()) > tol:
            found.append(f"weight {name} differs")
    return found


def compare(rev, runs, steps, workdir):
    from safetensors.torch import load_file
    old_tree = os.path.join(workdir, "before")
    checkout(rev, old_tree)
    models = inputs(os.path.join(workdir, "inputs"))
    data_dir = os.path.join(workdir, "inputs", "data")
    report = {}
    for index, run in enumerate(runs):
        rows, weights = [], []
        for tree in (ROOT, old_tree):
            out = os.path.join(workdir, f"{index}-{'now' if tree == ROOT else 'before'}")
            rows.append(train(tree, run, models, data_dir, out, steps))
            weights.append(load_file(os.path.join(out, "last", "model.safetensors")))
        report[run] = {"rows": len(rows[0]), "differences": differences(*rows, *weights)}
        print(f"{run:<28} {len(rows[0])} rows: " + ("the same" if not report[run]["differences"] else
                                                       "; ".join(report[run]["differences"][:5])), flush=True)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help='"METHOD STRATEGY [FLAGS]" each ("-": none)')
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        report = compare(args.against, args.runs, args.steps, workdir)
    if args.json:
        plumbing.write_atomic(args.json, json.dumps({"against": args.against, "runs": report}, indent=1))
    same = sum(not r["differences"] for r in report.values())
    print(f"{same} of {len(report)} runs give the same numbers as {args.against}")
    return 0 if same == len(report) else 1


if __name__ == "__main__":
    cli(main, "same_numbers")
