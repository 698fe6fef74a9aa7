"""The reward probe: does ARKD's immediate reward carry information about alpha, and where does an
action's credit land?

From one identical start (weights, optimizer state, dropout masks), for K batches and each alpha of
a grid: ONE action with that alpha, then the next action at --probe_next_alpha; the reward of each as
ARKD measures it, the best alpha and the signal-to-noise ratio the policy sees. The training flags
after `--` are arkd.py's (the student may be a checkpoint: its AdamW state is used when
training_state.pt is beside it; --lr is the step's learning rate).

    python -m experiments.probe --probe_batches 16 -- --teacher T --student RUN/last --data_dir D --out PROBE
"""
import argparse
import copy
import json
import os
import statistics
import sys

import torch

import arkd
import evaluate
from experiments import cli


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--probe_batches", type=int, default=16, help="batches (K), each from the same start")
    parser.add_argument("--probe_alphas", default="0,0.25,0.5,0.75,1", help="the alpha grid")
    parser.add_argument("--probe_step", type=int, default=0, help="the data step the batches come from")
    parser.add_argument("--probe_next_alpha", type=float, default=0.5, help="alpha of the action after")
    args = parser.parse_args(argv[:split])
    if args.probe_batches < 2:
        parser.error("--probe_batches must be >= 2 (the noise is measured across batches)")
    return reward_probe(args, argv[split + 1:])


if __name__ == "__main__":
    cli(main, "probe")
