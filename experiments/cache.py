"""The cached teacher measured (docs/method.md 8.6-8.8): how far FKL and RKL from a top-k cache fall from
the live teacher's at several k, and what a KD step costs with each (time, resident memory).

    python -m experiments.cache error --teacher T --student S --data_dir D [--examples 64] [--ks 16,64,256]
    python -m experiments.cache speed --teacher T --student S --data_dir D --out DIR [--steps 6] [--rounds 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import data
import plumbing
from losses import IGNORE_INDEX, cached_teacher_logits, forward_kl, next_token_targets, reverse_kl, teacher_summary
from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.no_grad()
def cache_error(args):
    """Per k: the token means of FKL and RKL against the cache's teacher and the live one, their relative
    gaps, the median per-token gap, the mean tail mass, and the cosine between the two gradients of
    FKL + RKL with respect to the student's logits (the cache's teacher held fixed, as training holds it)."""
    tokenizer = plumbing.load_tokenizer(args.student)
    vocab, cpu = len(tokenizer), torch.device("cpu")
    teacher, student = (plumbing.load_model(p, cpu, vocab_size=vocab).eval() for p in (args.teacher, args.student))
    records = data.load_records("dolly_train", args.data_dir)[:args.examples]
    examples, _ = data.encode_records(tokenizer, records, "dolly_train")
    ks = [int(k) for k in args.ks.split(",")]
    sums = {k: {"fkl": 0.0, "rkl": 0.0, "tail": 0.0, "dot": 0.0, "norm": 0.0, "gaps": []} for k in ks}
    live_sums, positions = {"fkl": 0.0, "rkl": 0.0, "norm": 0.0}, 0
    for start in range(0, len(examples), 4):
        batch = data.collate_train(examples[start:start + 4], tokenizer.pad_token_id)
        targets = next_token_targets(batch.pop("labels"))
        mask = targets != IGNORE_INDEX
        s = student(**batch).logits[mask][:, :vocab].float()
        t = teacher(**batch).logits[mask][:, :vocab].float()
        live_f, live_r, live_g = divergences_and_gradient(s, t)
        live_sums["fkl"] += float(live_f.sum())
        live_sums["rkl"] += float(live_r.sum())
        live_sums["norm"] += float(live_g.square().sum())
        positions += len(s)
        for k in ks:
            top_logp, top_ids, target_logp, tail_logp = teacher_summary(t, targets[mask], k)
            rebuilt = cached_teacher_logits(s, top_logp, top_ids, targets[mask], target_logp, tail_logp)
            f, r, g = divergences_and_gradient(s, rebuilt)
            entry = sums[k]
            entry["fkl"] += float(f.sum())
            entry["rkl"] += float(r.sum())
            entry["tail"] += float(tail_logp.exp().sum())
            entry["dot"] += float((g * live_g).sum())
            entry["norm"] += float(g.square().sum())
            entry["gaps"] += (((f + r) - (live_f + live_r)) / (live_f + live_r)).tolist()
    live = {name: live_sums[name] / positions for name in ("fkl", "rkl")}
    rows = {k: {"fkl": e["fkl"] / positions, "rkl": e["rkl"] / positions,
                "fkl_gap": e["fkl"] / live_sums["fkl"] - 1, "rkl_gap": e["rkl"] / live_sums["rkl"] - 1,
                "median_token_gap": statistics.median(e["gaps"]), "tail_mass": e["tail"] / positions,
                "gradient_cosine": e["dot"] / (e["norm"] * live_sums["norm"]) ** 0.5} for k, e in sums.items()}
    result = {"teacher": args.teacher, "student": args.student, "examples": len(examples), "positions": positions,
              "vocab": vocab, "live": live, "cache": rows}
    print(json.dumps(result, indent=1))
    return result


def divergences_and_gradient(student_logits, teacher_logits):
    """(FKL [P], RKL [P], d(FKL + RKL).sum() / d student_logits [P, V]) from the plain definitions."""
    with torch.enable_grad():
        s = student_logits.detach().requires_grad_()
        f, r = forward_kl(s, teacher_logits), reverse_kl(s, teacher_logits)
        grad, = torch.autograd.grad((f + r).sum(), s)
    return f.detach(), r.detach(), grad


def cache_speed(args):
    """Median seconds of a KD step (after the first 2) and the resident peak during steps (usage.json's
    step phase), with the live teacher and with its cache, in alternating subprocesses on one thread."""
    cache_dir = os.path.join(args.out, "cache")
    common = ["--student", args.student, "--teacher", args.teacher, "--data_dir", args.data_dir, "--train_examples",
              str(args.examples), "--batch_size", "8", "--grad_accum", "1", "--max_steps", str(args.steps),
              "--eval_every", "0", "--val_examples", "1", "--max_new_tokens", "1", "--strategy", "fkl", "--bf16", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run([sys.executable, os.path.join(ROOT, "arkd.py"), "--method", "cache", "--cache_k", str(args.k), "--out", cache_dir,
         *common], env)
    seconds, peaks = {"live": [], "cache": []}, {"live": [], "cache": []}
    for round_ in range(args.rounds):
        for variant, extra in (("live", []), ("cache", ["--teacher_cache", cache_dir])):
            out = os.path.join(args.out, f"{variant}-{round_}")
            run([sys.executable, "-m", "experiments.usage", "arkd.py", *common, *extra, "--out", out], env)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                seconds[variant] += [json.loads(line)["step_seconds"] for line in f if '"step_seconds"' in line][2:]
            with open(os.path.join(out, "usage.json")) as f:
                peaks[variant].append(json.load(f)["phases"]["step"]["peak_gb"])
    result = {name: {"median_step_s": statistics.median(seconds[name]), "step_peak_gb": max(peaks[name])} for name in seconds}
    result["cache_over_live_time"] = result["cache"]["median_step_s"] / result["live"]["median_step_s"]
    result["memory_saved_gb"] = result["live"]["step_peak_gb"] - result["cache"]["step_peak_gb"]
    print(json.dumps(result, indent=1))
    return result


def run(cmd, env):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise ValueError(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-2000:]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="The cached teacher against the live one.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("error", "speed"):
        command = commands.add_parser(name)
        for flag in ("--teacher", "--student", "--data_dir"):
            command.add_argument(flag, required=True)
        command.add_argument("--examples", type=int, default=64, help="training examples read")
    commands.choices["error"].add_argument("--ks", default="16,64,256", help="cache sizes k")
    speed = commands.choices["speed"]
    speed.add_argument("--out", required=True, help="the cache and the runs")
    speed.add_argument("--k", type=int, default=64, help="the cache's k")
    speed.add_argument("--steps", type=int, default=6, help="KD steps per run (the first 2 not timed)")
    speed.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    args = parser.parse_args(argv)
    return (cache_error if args.command == "error" else cache_speed)(args)


if __name__ == "__main__":
    cli(main, "cache")
