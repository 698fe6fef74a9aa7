"""The experiments behind the docs' findings: the reward probe, Figure 1 of the paper, the study's report.

    probe     does ARKD's immediate reward carry information about alpha? From one identical start
              (weights, optimizer state, dropout masks) ONE optimizer step with each alpha of a grid,
              for K batches: the reward per alpha (on the batch trained on, as ARKD uses it, and on a
              held-out batch in eval mode), the best alpha and the signal-to-noise ratio the policy
              sees; the training flags after `--` are arkd.py's (the student may be a checkpoint: its
              optimizer state is used when training_state.pt is beside it; --lr is the step's lr)
    figure1   mean- vs mode-seeking, exactly: a two-mode teacher over an ordered vocabulary in four
              contexts, a one-mode student family, FKL, RKL, fixed mixes and ARKD; per-mode masses
    study     the miniature study's report (run.sh study): intervals over training seeds, ARKD's
              paired differences, every seed's alpha

    python experiments.py probe --probe_batches 16 -- --teacher T --student RUN/last --data_dir D --out PROBE
    python experiments.py figure1 --out runs/figure1 [--figure1_steps 400 --figure1_seeds "1 2 3"]
    python experiments.py study --runs EVAL_DIRS... --train_dir RUNS --out REPORT
"""
import argparse
import copy
import glob
import json
import math
import os
import re
import statistics
import sys

import torch

import arkd
import data
import evaluate
import plumbing
from losses import (IGNORE_INDEX, STAT_NAMES, forward_kl, kd_pass, mix, next_token_targets, parse_strategy, reverse_kl,
                    stat_means, strategy_alpha)
from policy import ARKDPolicy, immediate_reward, make_state


# ----------------------------------------------------------------------------------------------
# The reward probe


class FixedAction:
    """Stands in for the ARKD policy in arkd.train_step: always the same alpha; keeps the reward."""

    def __init__(self, alpha):
        self.last_alpha, self.last_reward, self.last_beta, self.reward = alpha, 0.0, (None, None), None

    def act(self, state):
        return self.last_alpha

    def store_reward(self, reward):
        self.reward = reward
        return False                            # never an update

    def drop_action(self):
        self.reward = float("nan")


def reward_probe(args, train_argv):
    """Where an action's credit lands. From one training state (the student's weights and, when a
    checkpoint's training_state.pt is beside them, its AdamW moments), for K batches and each alpha
    of a grid: one action of --reward_every steps with that alpha, then the next action, as many
    steps at --probe_next_alpha; the reward of each, as ARKD measures it. With Adam's momentum an
    action also moves the steps after it, so part of its effect lands on the next action's reward.
    Writes OUT/probe.json and OUT/probe.png."""
    targs = arkd.parse_args(train_argv + ["--strategy", "arkd"])
    run = arkd.start(targs)
    torch.manual_seed(targs.seed)                # the dropout masks, the same on a rerun
    tokenizer, student, teacher = arkd.load_models(targs, run)
    examples, _, _ = arkd.load_training_data(targs, run, tokenizer, targs.data_dir)
    optimizer = torch.optim.AdamW(student.parameters(), lr=targs.lr, weight_decay=targs.weight_decay)
    state_path = os.path.join(targs.student, "training_state.pt")
    warm = os.path.isfile(state_path)
    if warm:
        optimizer.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True)["optimizer"])
        for group in optimizer.param_groups:       # the checkpoint's own lr is its last scheduled one: use --lr
            group["lr"] = targs.lr
    else:
        print(f"probe: {targs.student} has no training_state.pt: a fresh AdamW, which overstates an action's own effect")
    start_model, start_optimizer = copy.deepcopy(student.state_dict()), copy.deepcopy(optimizer.state_dict())
    alphas, span = [float(a) for a in args.probe_alphas.split(",")], targs.reward_every
    run.total_steps = max(run.total_steps, args.probe_step + 2 * span * args.probe_batches + 1)   # no early close

    def action_reward(alpha, first_step):          # one action of `span` steps; its reward
        action, window = FixedAction(alpha), None
        for step in range(first_step, first_step + span):
            batches = arkd.micro_batches(examples, step, targs, run)
            _, window = arkd.train_step(targs, run, student, teacher, optimizer, action, batches, step, window)
        return action.reward

    rows = []
    for k in range(args.probe_batches):
        first = args.probe_step + 2 * span * k     # each probe batch on its own data steps
        rng = torch.get_rng_state()
        for alpha in alphas:
            student.load_state_dict(start_model)
            optimizer.load_state_dict(copy.deepcopy(start_optimizer))   # step() changes the state in place
            torch.set_rng_state(rng)                                     # the same dropout masks for every alpha
            rows.append({"batch": k, "alpha": alpha, "reward": action_reward(alpha, first),
                         "next_reward": action_reward(args.probe_next_alpha, first + span)})
    summary = summarise_probe(rows, alphas)
    os.makedirs(targs.out, exist_ok=True)
    with open(os.path.join(targs.out, "probe.json"), "w") as f:
        json.dump({"student": targs.student, "teacher": targs.teacher, "lr": targs.lr, "batches": args.probe_batches,
                   "reward_every": span, "optimizer_state": warm, **summary, "rows": rows}, f, indent=1)
    plot_probe(summary, alphas, span, os.path.join(targs.out, "probe.png"))
    for name in ("reward", "next_reward"):
        s = summary[name]
        print(f"{name}: " + ", ".join(f"alpha {a:g}: {m:+.4f} +- {e:.4f}" for a, m, e in zip(alphas, s["mean"], s["stderr"]))
              + f"; best alpha {s['best_alpha']:g}, signal-to-noise {s['snr']:.2f}")
    effect = summary["effect"]
    print(f"alpha {alphas[-1]:g} vs {alphas[0]:g}: own reward {effect['own']:+.5f} +- {effect['own_stderr']:.5f}, "
          f"next action's {effect['next']:+.5f} +- {effect['next_stderr']:.5f}, carry-over {effect['carry_over']:.2f}")
    return summary


def summarise_probe(rows, alphas):
    """Per alpha: mean and standard error over batches; the best alpha; SNR = (max - min over alpha of
    the mean) / (the std across batches, averaged over alpha). effect: the last alpha minus the first,
    paired by batch, on the action's own reward and on the next one's; carry_over = next / own."""
    summary = {}
    for name in ("reward", "next_reward"):
        per_alpha = [[r[name] for r in rows if r["alpha"] == a] for a in alphas]
        means = [statistics.fmean(v) for v in per_alpha]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_alpha]
        spread = statistics.fmean(stds)
        summary[name] = {"mean": means, "stderr": [s / len(v) ** 0.5 for s, v in zip(stds, per_alpha)],
                         "best_alpha": alphas[means.index(max(means))],
                         "snr": (max(means) - min(means)) / spread if spread > 0 else float("inf")}
    by_batch = {}
    for r in rows:
        by_batch.setdefault(r["batch"], {})[r["alpha"]] = r
    effect = {}
    for name, key in (("reward", "own"), ("next_reward", "next")):
        diffs = [b[alphas[-1]][name] - b[alphas[0]][name] for b in by_batch.values()]
        effect[key], effect[key + "_stderr"] = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    effect["carry_over"] = effect["next"] / effect["own"] if effect["own"] else float("nan")
    summary["effect"] = effect
    return summary


def plot_probe(summary, alphas, span, path):
    fig, ax = evaluate.new_figure(6, 3.5)
    for name, label in (("reward", "the action's own reward"), ("next_reward", "the next action's reward")):
        ax.errorbar(alphas, summary[name]["mean"], yerr=summary[name]["stderr"], marker="o", capsize=3,
                    label=f"{label}, SNR {summary[name]['snr']:.2f}")
    ax.set(xlabel="alpha (FKL weight) of the action", ylabel="reward",
           title=f"reward probe, actions of {span} steps (mean +- s.e.); carry-over {summary['effect']['carry_over']:.2f}")
    ax.legend(fontsize=8)
    evaluate.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Figure 1 of the paper: mean- vs mode-seeking, exactly, on a two-mode teacher and a one-mode student


FIGURE1_VOCAB, FIGURE1_MODES, FIGURE1_WIDTH = 100, (30, 70), 4.0
FIGURE1_CONTEXTS = (0.5, 0.6, 0.7, 0.8)             # the weight of mode a in each context
FIGURE1_STRATEGIES = ("fkl", "rkl", "fixed:0.25", "fixed:0.5", "fixed:0.75", "arkd")


def two_mode_teacher(weights):
    """Teacher log-probabilities [C, V]: in context c a mixture of two discretised Gaussians over the
    ordered vocabulary 0..V-1, mode a (token 30) with weight weights[c] and mode b (token 70) the rest."""
    v = torch.arange(FIGURE1_VOCAB, dtype=torch.float64)
    bump = [torch.exp(-(v - m) ** 2 / (2 * FIGURE1_WIDTH ** 2)) for m in FIGURE1_MODES]
    p = weights.unsqueeze(1) * bump[0] + (1 - weights.unsqueeze(1)) * bump[1]
    return (p / p.sum(-1, keepdim=True)).log()


class OneModeStudent(torch.nn.Module):
    """One discretised Gaussian per context, logits_v = -(v - mean_c)^2 / (2 width_c^2): a family with
    one mode, which cannot represent the two-mode teacher, so the KL direction decides what it gives up.
    It starts narrow (width 5) between the modes, at 50 + 4 N(0, 1)."""

    def __init__(self, contexts, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mean = torch.nn.Parameter(FIGURE1_VOCAB / 2 + 4 * torch.randn(contexts, generator=g, dtype=torch.float64))
        self.log_width = torch.nn.Parameter(torch.full((contexts,), math.log(5.0), dtype=torch.float64))

    def forward(self):
        v = torch.arange(FIGURE1_VOCAB, dtype=torch.float64)
        return -(v - self.mean.unsqueeze(1)) ** 2 / (2 * self.log_width.exp().unsqueeze(1) ** 2)   # [C, V]


def fit_one_mode_student(teacher, strategy, steps, seed, lr=0.2):
    """Adam on alpha FKL + (1 - alpha) RKL (kd_pass, one token per context) for `steps` steps; ARKD's
    policy picks alpha from the same state and immediate reward as in training. Returns (q [C, V], alphas)."""
    student, mask = OneModeStudent(len(teacher), seed), torch.ones(len(teacher), dtype=torch.bool)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    policy = ARKDPolicy(seed=seed) if strategy == "arkd" else None
    alphas = []
    for step in range(steps):
        out = kd_pass(student(), teacher, mask)
        before = stat_means(out.stats)
        alpha = policy.act(make_state(before, step / steps, policy.last_alpha, policy.last_reward)) if policy \
            else strategy_alpha(parse_strategy(strategy), step, steps, out.stats)
        optimizer.zero_grad()
        mix(out.fkl, out.rkl, alpha).mean().backward()
        optimizer.step()
        if policy is not None:
            with torch.no_grad():
                after = stat_means(kd_pass(student(), teacher, mask, akl=False).stats)
            if policy.store_reward(immediate_reward(before["fkl"], before["rkl"], after["fkl"], after["rkl"])):
                policy.update()
        alphas.append(alpha)
    return torch.softmax(student().detach(), -1), alphas


def mode_masses(q):
    """Exact masses per context [C]: within 2 widths of mode a, of mode b, and elsewhere (the valley, the tails)."""
    v = torch.arange(q.shape[-1])
    near = [(v - m).abs() <= 2 * FIGURE1_WIDTH for m in FIGURE1_MODES]
    return {"mode_a": q[:, near[0]].sum(-1).tolist(), "mode_b": q[:, near[1]].sum(-1).tolist(),
            "elsewhere": q[:, ~(near[0] | near[1])].sum(-1).tolist()}


def figure1(args):
    """Figure 1 of the paper, exactly: every strategy's one-mode student of the two-mode teacher in each
    context, per-mode mass computed from the distributions (no sampling). OUT/figure1.json and .png."""
    teacher = two_mode_teacher(torch.tensor(FIGURE1_CONTEXTS, dtype=torch.float64))
    results = {"teacher": {**mode_masses(teacher.exp()), "q": teacher.exp().tolist()}}
    for strategy in FIGURE1_STRATEGIES:
        for seed in map(int, args.figure1_seeds.split()):
            q, alphas = fit_one_mode_student(teacher, strategy, args.figure1_steps, seed)
            results[f"{strategy}-s{seed}"] = {**mode_masses(q), "q": q.tolist(), "mean_alpha": statistics.fmean(alphas),
                                              "fkl": forward_kl(q.log(), teacher).tolist(), "rkl": reverse_kl(q.log(), teacher).tolist()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "figure1.json"), "w") as f:
        json.dump({"contexts": FIGURE1_CONTEXTS, "modes": FIGURE1_MODES, "steps": args.figure1_steps, "results": results}, f)
    fig, axes = evaluate.new_figure(11, 3.5, columns=2)
    for ax, c in zip(axes, (0, len(FIGURE1_CONTEXTS) - 1)):
        ax.fill_between(range(FIGURE1_VOCAB), results["teacher"]["q"][c], color="0.8", label="teacher p")
        for strategy in ("fkl", "rkl", "fixed:0.5", "arkd"):
            ax.plot(results[f"{strategy}-s{args.figure1_seeds.split()[0]}"]["q"][c], label=f"student q: {strategy}")
        ax.set(xlabel="token (an ordered vocabulary)", title=f"mode a weighs {FIGURE1_CONTEXTS[c]}")
    axes[0].legend(fontsize=8)
    evaluate.save_figure(fig, os.path.join(args.out, "figure1.png"))
    for name, r in results.items():
        print(f"{name:>14}: mass near mode a {' '.join(f'{x:.2f}' for x in r['mode_a'])}, near mode b "
              f"{' '.join(f'{x:.2f}' for x in r['mode_b'])}, elsewhere {' '.join(f'{x:.2f}' for x in r['elsewhere'])}")
    return results


# ----------------------------------------------------------------------------------------------
# The miniature study's report (run.sh study)


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values):
    """(mean, half-width of the 95% Student-t interval) over independent runs; one run: (value, nan)."""
    if len(values) < 2:
        return statistics.fmean(values), float("nan")
    return statistics.fmean(values), T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5


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
    examples, _ = data.encode_records(tokenizer, records, "dollyeval")
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
        return response_ce(model, data.encode_records(tokenizer, as_records)[0], tokenizer.pad_token_id, vocab)

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
    scores = {}                                       # strategy -> seed -> heldout.json
    for run in run_dirs:
        match = re.fullmatch(r"(.+)-s(\d+)", os.path.basename(run.rstrip("/")))
        strategy, seed = (match.group(1), match.group(2)) if match else (os.path.basename(run), "-")
        with open(os.path.join(run, "heldout.json")) as f:
            scores.setdefault(strategy, {})[seed] = json.load(f)
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
             "| run | seeds | " + " | ".join(m for m, _ in STUDY_METRICS) + " |",
             "| --- | --- |" + " --- |" * len(STUDY_METRICS)]
    for k, row in table.items():
        lines.append(f"| {k} | {len(scores[k])} | " + " | ".join(
            f"{m:.4f}" + ("" if math.isnan(h) else f" +- {h:.4f}") for m, h in row.values()) + " |")
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
        {"scores": scores, "mean_ci": table, "best_fixed": best, "minus_best_fixed": {k: list(v) for k, v in paired.items()}},
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
    argv = sys.argv[1:] if argv is None else argv
    train_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("command", choices=("probe", "figure1", "heldout", "study"), help="which experiment (see above)")
    parser.add_argument("--out", default=None, help="figure1, study: output directory")
    parser.add_argument("--probe_batches", type=int, default=16, help="probe: batches (K), each from the same start")
    parser.add_argument("--probe_alphas", default="0,0.25,0.5,0.75,1", help="probe: the alpha grid")
    parser.add_argument("--probe_step", type=int, default=0, help="probe: the data step the batches come from")
    parser.add_argument("--probe_next_alpha", type=float, default=0.5, help="probe: alpha of the action after")
    parser.add_argument("--figure1_steps", type=int, default=400, help="figure1: Adam steps per student")
    parser.add_argument("--figure1_seeds", default="1 2 3", help="figure1: seeds (student start, policy) per strategy")
    parser.add_argument("--model", help="heldout: the model to measure")
    parser.add_argument("--teacher", help="heldout: the teacher")
    parser.add_argument("--data_dir", help="heldout: the data (its DollyEval file is the held-out set)")
    parser.add_argument("--teacher_samples", help="heldout: the teacher's samples (JSON; written if missing)")
    parser.add_argument("--heldout_seed", type=int, default=10, help="heldout: sampling seed")
    parser.add_argument("--max_new_tokens", type=int, default=24, help="heldout: tokens sampled per prompt")
    parser.add_argument("--runs", nargs="+", help="study: measured runs named STRATEGY-sSEED (or one name)")
    parser.add_argument("--train_dir", help="study: the training runs (for the ARKD alpha plot)")
    parser.add_argument("--title", default="Miniature study", help="study: heading of results.md")
    args = parser.parse_args(argv)
    if args.command == "probe":
        if args.probe_batches < 2:
            parser.error("--probe_batches must be >= 2 (the noise is measured across batches)")
        return reward_probe(args, train_argv)
    if not args.out:
        parser.error(f"{args.command} needs --out")
    if args.command == "figure1":
        return figure1(args)
    if args.command == "heldout":
        if not (args.model and args.teacher and args.data_dir and args.teacher_samples):
            parser.error("heldout needs --model, --teacher, --data_dir and --teacher_samples")
        return heldout_metrics(args)
    if not (args.runs and args.train_dir):
        parser.error("study needs --runs and --train_dir")
    study_report(args.runs, args.train_dir, args.out, args.title)
    print(f"wrote {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.py: {err}")
