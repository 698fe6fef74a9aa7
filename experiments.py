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
from losses import IGNORE_INDEX, forward_kl, kd_pass, mix, parse_strategy, reverse_kl, stat_means, strategy_alpha
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
    """One step per alpha from an identical start, K batches; writes OUT/probe.json and probe.png."""
    targs = arkd.parse_args(train_argv + ["--strategy", "arkd", "--reward_every", "1"])
    run = arkd.start(targs)
    torch.manual_seed(targs.seed)                # the dropout masks, the same on a rerun
    tokenizer, student, teacher = arkd.load_models(targs, run)
    examples, _, _ = arkd.load_training_data(targs, run, tokenizer, targs.data_dir)
    optimizer = torch.optim.AdamW(student.parameters(), lr=targs.lr, weight_decay=targs.weight_decay)
    state_path = os.path.join(targs.student, "training_state.pt")
    if os.path.isfile(state_path):
        optimizer.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True)["optimizer"])
        for group in optimizer.param_groups:       # the checkpoint's own lr is its last scheduled one: use --lr
            group["lr"] = targs.lr
    start_model, start_optimizer = copy.deepcopy(student.state_dict()), copy.deepcopy(optimizer.state_dict())
    alphas = [float(a) for a in args.probe_alphas.split(",")]

    @torch.no_grad()
    def heldout_kls(batch):                     # eval mode: no dropout, so before and after compare
        student.eval()
        targets = batch["targets"].to(run.device)
        out = kd_pass(arkd.forward(student, batch, run), arkd.forward(teacher, batch, run),
                      targets != IGNORE_INDEX, targs.tau, run.vocab_size, target_ids=targets, akl=False)   # FKL, RKL only
        student.train()
        return stat_means(out.stats)

    rows = []
    for k in range(args.probe_batches):
        batches = arkd.micro_batches(examples, args.probe_step + k, targs, run)
        heldout = arkd.micro_batches(examples, args.probe_step + k + args.probe_batches, targs, run)[0]
        rng = torch.get_rng_state()
        for alpha in alphas:
            student.load_state_dict(start_model)
            optimizer.load_state_dict(copy.deepcopy(start_optimizer))   # step() changes the state in place
            torch.set_rng_state(rng)                                     # the same dropout masks for every alpha
            before, action = heldout_kls(heldout), FixedAction(alpha)
            row, _ = arkd.train_step(targs, run, student, teacher, optimizer, action, batches, args.probe_step + k)
            after = heldout_kls(heldout)
            rows.append({"batch": k, "alpha": alpha, "reward": action.reward,
                         "heldout_reward": (before["fkl"] - after["fkl"]) / before["fkl"] + (before["rkl"] - after["rkl"]) / before["rkl"],
                         "heldout_fkl_drop": (before["fkl"] - after["fkl"]) / before["fkl"],
                         "heldout_rkl_drop": (before["rkl"] - after["rkl"]) / before["rkl"]})
    summary = summarise_probe(rows, alphas)
    os.makedirs(targs.out, exist_ok=True)
    with open(os.path.join(targs.out, "probe.json"), "w") as f:
        json.dump({"student": targs.student, "teacher": targs.teacher, "lr": targs.lr, "batches": args.probe_batches,
                   **summary, "rows": rows}, f, indent=1)
    plot_probe(summary, alphas, os.path.join(targs.out, "probe.png"))
    for name in ("reward", "heldout_reward"):
        s = summary[name]
        print(f"{name}: " + ", ".join(f"alpha {a:g}: {m:+.4f} +- {e:.4f}" for a, m, e in zip(alphas, s["mean"], s["stderr"]))
              + f"; best alpha {s['best_alpha']:g}, signal-to-noise {s['snr']:.2f}")
    return summary


def summarise_probe(rows, alphas):
    """Per alpha: mean and standard error over batches; the best alpha; SNR = (max - min over alpha of
    the mean) / (the std across batches, averaged over alpha)."""
    summary = {}
    for name in ("reward", "heldout_reward", "heldout_fkl_drop", "heldout_rkl_drop"):
        per_alpha = [[r[name] for r in rows if r["alpha"] == a] for a in alphas]
        means = [statistics.fmean(v) for v in per_alpha]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_alpha]
        spread = statistics.fmean(stds)
        summary[name] = {"mean": means, "stderr": [s / len(v) ** 0.5 for s, v in zip(stds, per_alpha)],
                         "best_alpha": alphas[means.index(max(means))],
                         "snr": (max(means) - min(means)) / spread if spread > 0 else float("inf")}
    return summary


def plot_probe(summary, alphas, path):
    fig, ax = evaluate.new_figure(6, 3.5)
    for name, label in (("reward", "on the batch trained on (ARKD's reward)"), ("heldout_reward", "on a held-out batch")):
        ax.errorbar(alphas, summary[name]["mean"], yerr=summary[name]["stderr"], marker="o", capsize=3,
                    label=f"{label}, SNR {summary[name]['snr']:.2f}")
    ax.set(xlabel="alpha (FKL weight) of the one step", ylabel="immediate reward", title="reward probe (mean +- s.e.)")
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


def study_report(run_dirs, train_dir, out_dir, title):
    """The miniature study: per strategy the mean Rouge-L and its 95% interval over training seeds (runs
    named STRATEGY-sSEED; each run's score is its mean over sampling seeds), ARKD's paired difference
    with every baseline (paired by training seed), results.md / results.json, a heatmap, and every ARKD
    seed's alpha trajectory on one plot."""
    scores = {}                                       # strategy -> seed -> {dataset: Rouge-L, "all": mean}
    for run in run_dirs:
        with open(os.path.join(run, "results.json")) as f:
            summary = json.load(f)
        match = re.fullmatch(r"(.+)-s(\d+)", summary["label"])
        strategy, seed = (match.group(1), match.group(2)) if match else (summary["label"], "-")
        per_set = {d: m["rougeL"]["mean"] for d, m in summary["results"].items()}
        scores.setdefault(strategy, {})[seed] = {**per_set, "all": statistics.fmean(per_set.values())}
    columns = [d for d in data.DATASETS if any(d in s for seeds in scores.values() for s in seeds.values())] + ["all"]
    table = {k: {c: mean_ci([s[c] for s in seeds.values()]) for c in columns} for k, seeds in scores.items()}
    paired = {}
    for other, seeds in scores.items():
        common = sorted(set(seeds) & set(scores.get("arkd", {})) - {"-"})
        if other != "arkd" and len(common) >= 2:
            paired[other] = mean_ci([scores["arkd"][s]["all"] - seeds[s]["all"] for s in common]) + (len(common),)
    lines = [f"# {title}", "", "Rouge-L x 100: mean over training seeds +- half-width of the 95% t interval "
             "(each run: the mean over sampling seeds); `all` is the mean over the sets.", "",
             "| run | seeds | " + " | ".join(columns) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for k, row in table.items():
        lines.append(f"| {k} | {len(scores[k])} | " + " | ".join(
            f"{m:.2f}" + ("" if math.isnan(h) else f" +- {h:.2f}") for m, h in row.values()) + " |")
    if paired:
        lines += ["", "ARKD minus each baseline (`all`), paired by training seed: mean +- 95% half-width.", "",
                  "| baseline | ARKD - baseline | pairs |", "| --- | --- | --- |"]
        lines += [f"| {k} | {m:+.2f} +- {h:.2f} | {n} |" for k, (m, h, n) in paired.items()]
        detectable = statistics.median(h for _, h, _ in paired.values())
        lines += ["", f"Smallest difference this study can detect (median half-width of the paired intervals): "
                      f"about {detectable:.2f} points."]
    os.makedirs(out_dir, exist_ok=True)
    plumbing.write_atomic(os.path.join(out_dir, "results.md"), "\n".join(lines) + "\n")
    plumbing.write_atomic(os.path.join(out_dir, "results.json"), json.dumps(
        {"scores": scores, "mean_ci": table, "arkd_minus": {k: list(v) for k, v in paired.items()}}, indent=1))
    evaluate.heatmap([[m for m, _ in row.values()] for row in table.values()], list(table), columns, f"Rouge-L: {title}",
            os.path.join(out_dir, "rougeL_heatmap.png"))
    plot_alpha_seeds(sorted(glob.glob(os.path.join(train_dir, "arkd-s*"))), os.path.join(out_dir, "alpha_seeds.png"))
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
    parser.add_argument("command", choices=("probe", "figure1", "study"), help="which experiment (see above)")
    parser.add_argument("--out", default=None, help="figure1, study: output directory")
    parser.add_argument("--probe_batches", type=int, default=16, help="probe: batches (K), each from the same start")
    parser.add_argument("--probe_alphas", default="0,0.25,0.5,0.75,1", help="probe: the alpha grid")
    parser.add_argument("--probe_step", type=int, default=0, help="probe: the data step the batches come from")
    parser.add_argument("--figure1_steps", type=int, default=400, help="figure1: Adam steps per student")
    parser.add_argument("--figure1_seeds", default="1 2 3", help="figure1: seeds (student start, policy) per strategy")
    parser.add_argument("--runs", nargs="+", help="study: evaluated runs named STRATEGY-sSEED (or one name)")
    parser.add_argument("--train_dir", help="study: the training runs (for the ARKD alpha plot)")
    parser.add_argument("--title", default="Miniature study", help="study: heading of results.md and the heatmap")
    args = parser.parse_args(argv)
    if args.command == "probe":
        if args.probe_batches < 2:
            parser.error("--probe_batches must be >= 2 (the noise is measured across batches)")
        return reward_probe(args, train_argv)
    if not args.out:
        parser.error(f"{args.command} needs --out")
    if args.command == "figure1":
        return figure1(args)
    if not (args.runs and args.train_dir):
        parser.error("study needs --runs and --train_dir")
    study_report(args.runs, args.train_dir, args.out, args.title)
    print(f"wrote {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.py: {err}")
