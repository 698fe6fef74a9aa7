"""The miniature study (run.sh study; its held-out metrics and report also run.sh mini's): the toy task
with several right answers; held-out metrics of a model against the teacher (FKL, RKL and their sum
J teacher-forced on the references, the student's CE, precision and coverage of sampled responses,
Rouge-L); the report: every metric's mean and 95% interval over training seeds, each run minus the
best fixed alpha paired by seed, the headroom check, every ARKD seed's alpha trajectory.

    python -m experiments.study data --out DIR            # the study's toy task with several right answers
    python -m experiments.study heldout --model M --teacher T --data_dir D --teacher_samples S.json --out DIR
    python -m experiments.study report --runs HELDOUT_DIRS... --train_dir RUNS --out REPORT
"""
import argparse
import glob
import json
import math
import os
import re
import statistics

import torch
from scipy import stats

import data
import evaluate
import plumbing
from losses import IGNORE_INDEX, STAT_NAMES, kd_pass, next_token_targets, stat_means
from experiments import cli


# The study's toy task: every split holds two tasks whose answers have several right values, each equally
# likely in the training data (so a teacher learns a multi-modal answer distribution), beside two of the
# smoke's; dolly/valid.jsonl (the DollyEval layout: the study's held-out set) holds 200 records.
SPLITS = {relative: (200 if relative == "dolly/valid.jsonl" else count, ("reverse", "sort", "pick", "between"), (2, 3, 4))
          for relative, (count, _, _) in data.SYNTHETIC_SPLITS.items()}


def multimodal_record(rng, task, length):
    """pick: any one of the words; between: any number in a range; else the smoke's task."""
    if task == "pick":
        words = rng.sample(data.SYNTHETIC_WORDS, length + 1)
        return {"instruction": "Name one of the words.", "input": " ".join(words), "output": rng.choice(words)}
    if task == "between":
        low = rng.randrange(10, 85)
        return {"instruction": f"Write a number from {low} to {low + 2 * length}.", "input": "",
                "output": str(rng.randint(low, low + 2 * length))}
    return data.synthetic_record(rng, task, length)


def mean_ci(values):
    """(mean, half-width of the 95% Student-t interval) over independent runs; one run: (value, nan)."""
    if len(values) < 2:
        return statistics.fmean(values), float("nan")
    t = stats.t.ppf(0.975, len(values) - 1)
    return statistics.fmean(values), float(t) * statistics.stdev(values) / len(values) ** 0.5


def response_batches(examples, pad_id, batch_size=32):
    """(batch, next-token targets, mask of response tokens) for teacher forcing `examples`."""
    for lo in range(0, len(examples), batch_size):
        batch = data.collate_train(examples[lo:lo + batch_size], pad_id)
        targets = next_token_targets(batch.pop("labels"))
        yield batch, targets, targets != IGNORE_INDEX


@torch.no_grad()
def response_scores(student, teacher, examples, pad_id, vocab_size):
    """Token means over the responses of `examples`, teacher-forced in eval mode: FKL, RKL and the
    student's CE."""
    sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    for batch, targets, mask in response_batches(examples, pad_id):
        sums += kd_pass(student(**batch).logits, teacher(**batch).logits, mask, 1.0, vocab_size, target_ids=targets, akl=False).stats
    return stat_means(sums)


@torch.no_grad()
def response_ce(model, examples, pad_id, vocab_size):
    """One model's mean -log p per response token of `examples`, teacher-forced in eval mode."""
    total, tokens = 0.0, 0
    for batch, targets, mask in response_batches(examples, pad_id):
        logits = model(**batch).logits[..., :vocab_size][mask].float()
        total += float(torch.nn.functional.cross_entropy(logits, targets[mask], reduction="sum"))
        tokens += int(mask.sum())
    return total / max(tokens, 1)


def heldout_metrics(args):
    """The study's held-out metrics of one model against the teacher on the DollyEval file (written to
    OUT/heldout.json): teacher-forced on the references FKL, RKL, their sum J (the primary metric) and
    the student's CE; precision, the teacher's mean log-probability per token of the student's sampled
    responses; coverage, the student's of the teacher's (sampled once, kept in --teacher_samples);
    Rouge-L of the student's samples (secondary)."""
    tokenizer = plumbing.load_tokenizer(args.model)
    vocab = len(tokenizer)
    student, teacher = (plumbing.load_model(path, torch.device("cpu"), torch.float32, vocab).eval()
                        for path in (args.model, args.teacher))
    records = data.load_records("dollyeval", args.data_dir)
    examples, _ = data.encode_records(tokenizer, records, "dollyeval", args.max_prompt, args.max_total)
    prompts = [e["prompt_ids"] for e in examples]

    def sample(model):
        return evaluate.generate(model, tokenizer, prompts, args.heldout_seed, 64, args.max_new_tokens, progress=False)

    if not os.path.isfile(args.teacher_samples):
        plumbing.write_atomic(args.teacher_samples, json.dumps(sample(teacher)))
    with open(args.teacher_samples, encoding="utf-8") as f:
        teacher_samples = json.load(f)
    student_samples = sample(student)

    def ce_on(samples, model):                         # model's CE on the prompts with these responses
        as_records = [{**records[e["index"]], "references": [s]} for e, s in zip(examples, samples)]
        encoded = data.encode_records(tokenizer, as_records, "samples", args.max_prompt, args.max_total)[0]
        return response_ce(model, encoded, tokenizer.pad_token_id, vocab)

    refs = response_scores(student, teacher, examples, tokenizer.pad_token_id, vocab)
    result = {"model": args.model, "records": len(examples), "fkl": refs["fkl"], "rkl": refs["rkl"],
              "J": refs["fkl"] + refs["rkl"], "ce": refs["student_ce"],
              "precision": -ce_on(student_samples, teacher), "coverage": -ce_on(teacher_samples, student),
              "rougeL": statistics.fmean(evaluate.rouge_l(p, records[e["index"]]["references"])
                                         for p, e in zip(student_samples, examples))}
    os.makedirs(args.out, exist_ok=True)
    plumbing.write_atomic(os.path.join(args.out, "heldout.json"), json.dumps(result, indent=1))
    print(" ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result


# Lower is better for J, FKL, RKL and CE; higher for precision, coverage and Rouge-L.
STUDY_METRICS = (("J", -1), ("fkl", -1), ("rkl", -1), ("ce", -1), ("precision", 1), ("coverage", 1), ("rougeL", 1))
SCHEDULES = ("linear-0.9-0.1", "linear-0.1-0.9")


def study_report(run_dirs, train_dir, out_dir, title):
    """The study: per strategy every held-out metric's mean and 95% interval over training seeds (runs
    named STRATEGY-sSEED); the headroom check (each schedule minus the best fixed alpha on J, paired by
    seed); every adaptive method and control minus the best fixed alpha; the smallest difference the
    study can detect (the median paired half-width); results.md / results.json; every ARKD seed's
    alpha trajectory."""
    scores, updates = {}, {}                          # strategy -> seed -> heldout.json; its REINFORCE updates
    for run in run_dirs:
        name = os.path.basename(run.rstrip("/"))
        match = re.fullmatch(r"(.+)-s(\d+)", name)
        strategy, seed = (match.group(1), match.group(2)) if match else (name, "-")
        with open(os.path.join(run, "heldout.json")) as f:
            scores.setdefault(strategy, {})[seed] = json.load(f)
        metrics = os.path.join(train_dir, name, "metrics.jsonl")
        if os.path.isfile(metrics):                   # rows with policy_loss: one per REINFORCE update
            with open(metrics, encoding="utf-8") as f:
                updates.setdefault(strategy, []).append(sum('"policy_loss"' in line for line in f))
    table = {k: {m: mean_ci([s[m] for s in seeds.values()]) for m, _ in STUDY_METRICS} for k, seeds in scores.items()}
    fixed = [k for k in scores if k.startswith("fixed-") and k[6:].replace(".", "", 1).isdigit()]
    best = min(fixed, key=lambda k: table[k]["J"][0]) if fixed else None

    def minus_best(name):                             # paired by seed, on J (negative: better than the best fixed)
        common = sorted(set(scores[name]) & set(scores[best]) - {"-"})
        return mean_ci([scores[name][s]["J"] - scores[best][s]["J"] for s in common]) + (len(common),)

    paired = {k: minus_best(k) for k in scores if best and k != best and len(set(scores[k]) & set(scores[best])) >= 2}
    lines = [f"# {title}", "", "Held-out metrics (the DollyEval file, teacher-forced in eval mode): mean over training "
             "seeds +- half-width of the 95% t interval. J = FKL + RKL is the primary metric (lower is better); "
             "precision and coverage are mean log-probabilities per token (higher is better).", "",
             "| run | seeds | " + " | ".join(m for m, _ in STUDY_METRICS) + " | policy updates per seed |",
             "| --- | --- |" + " --- |" * (len(STUDY_METRICS) + 1)]
    for k, row in table.items():
        lines.append(f"| {k} | {len(scores[k])} | " + " | ".join(
            f"{m:.4f}" + ("" if math.isnan(h) else f" +- {h:.4f}") for m, h in row.values()) + " | " +
            (", ".join(map(str, updates[k])) if any(updates.get(k, ())) else "-") + " |")
    if paired:
        lines += ["", f"Each run minus the best fixed alpha ({best}) on J, paired by training seed: mean +- 95% "
                  "half-width (negative: better; bold: the interval excludes 0).", "",
                  "| run | J - best fixed | pairs |", "| --- | --- | --- |"]
        lines += [f"| {k} | " + (f"**{m:+.4f} +- {h:.4f}**" if abs(m) > h else f"{m:+.4f} +- {h:.4f}") + f" | {n} |"
                  for k, (m, h, n) in paired.items()]
        detectable = statistics.median(h for _, h, _ in paired.values())
        headroom = [k for k in SCHEDULES if k in paired and paired[k][0] + paired[k][1] < 0]
        lines += ["", f"Smallest difference in J this study can detect (median paired half-width): {detectable:.4f} "
                      f"({100 * detectable / table[best]['J'][0]:.1f}% of the best fixed alpha's J).",
                  "Headroom: " + (f"{', '.join(headroom)} beat the best fixed alpha beyond the interval." if headroom else
                                  "no schedule beats the best fixed alpha beyond the interval: on this task no "
                                  "adaptive alpha has a schedule to find that a fixed alpha lacks.")]
    os.makedirs(out_dir, exist_ok=True)
    plumbing.write_atomic(os.path.join(out_dir, "results.md"), "\n".join(lines) + "\n")
    plumbing.write_atomic(os.path.join(out_dir, "results.json"), json.dumps(
        {"scores": scores, "mean_ci": table, "best_fixed": best, "minus_best_fixed": {k: list(v) for k, v in paired.items()},
         "policy_updates": updates},
        indent=1))
    arkd_runs = sorted(glob.glob(os.path.join(train_dir, "arkd-s*")))
    if arkd_runs:
        plot_alpha_seeds(arkd_runs, os.path.join(out_dir, "alpha_seeds.png"))
    return table, paired


def plot_alpha_seeds(run_dirs, path):
    """The policy's mean alpha a / (a + b) (and the sampled alpha, faint) of every ARKD run on one plot."""
    fig, ax = evaluate.new_figure(7, 3.5)
    for i, run in enumerate(run_dirs):
        rows = evaluate.read_metrics(run)
        colour = f"C{i}"
        ax.plot([r["step"] for r in rows], [r["alpha"] for r in rows], color=colour, lw=0.4, alpha=0.3)
        ax.plot([r["step"] for r in rows], [r["beta_a"] / (r["beta_a"] + r["beta_b"]) for r in rows], color=colour,
                lw=1.5, label=f"{os.path.basename(run)}: policy mean")
    ax.set(xlabel="step", ylabel="alpha (FKL weight)", ylim=(0, 1), title="ARKD alpha, every training seed")
    ax.legend(fontsize=8)
    evaluate.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    toy = commands.add_parser("data", help="the study's toy task and a tokenizer trained on it (OUT/tokenizer)")
    toy.add_argument("--seed", type=int, default=0, help="random seed of the toy data")
    heldout = commands.add_parser("heldout", help="one model's held-out metrics against the teacher (heldout.json)")
    heldout.add_argument("--model", required=True, help="the model to measure")
    heldout.add_argument("--teacher", required=True, help="the teacher")
    heldout.add_argument("--data_dir", required=True, help="the data (its DollyEval file is the held-out set)")
    heldout.add_argument("--teacher_samples", required=True, help="the teacher's samples (JSON; written if missing)")
    heldout.add_argument("--heldout_seed", type=int, default=10, help="sampling seed")
    heldout.add_argument("--max_new_tokens", type=int, default=24, help="tokens sampled per prompt")
    heldout.add_argument("--max_prompt", type=int, default=data.MAX_PROMPT_TOKENS, help="longer prompts are dropped")
    heldout.add_argument("--max_total", type=int, default=data.MAX_TOTAL_TOKENS, help="prompt + reference cut at this")
    report = commands.add_parser("report", help="the study's report of held-out runs")
    report.add_argument("--runs", nargs="+", required=True, help="measured runs named STRATEGY-sSEED (or one name)")
    report.add_argument("--train_dir", required=True, help="the training runs (for the ARKD alpha plot)")
    report.add_argument("--title", default="Miniature study", help="heading of results.md")
    for command in (toy, heldout, report):
        command.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    if args.command == "data":
        return print(data.write_synthetic(args.out, args.seed, SPLITS, multimodal_record, tokenizer=True))
    if args.command == "heldout":
        return heldout_metrics(args)
    study_report(args.runs, args.train_dir, args.out, args.title)
    print(f"wrote {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    cli(main, "study")
