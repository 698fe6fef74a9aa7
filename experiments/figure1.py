"""Figure 1 of the paper, exactly: mean- vs mode-seeking on a two-mode teacher over an ordered
vocabulary in four contexts and a one-mode student family; FKL, RKL, fixed mixes and ARKD; the
per-mode masses computed from the distributions (no sampling).

    python -m experiments.figure1 --out runs/figure1 [--figure1_steps 400 --figure1_seeds "1 2 3"]
"""
import argparse
import json
import math
import os
import statistics

import torch

import evaluate
from losses import forward_kl, kd_pass, mix, parse_strategy, reverse_kl, stat_means, strategy_alpha
from policy import ARKDPolicy, immediate_reward, make_state
from experiments import cli

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
        before = {**stat_means(out.stats), "student_ce": 0.0}      # no reference tokens here: the CE feature held at 0
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory: figure1.json, figure1.png")
    parser.add_argument("--figure1_steps", type=int, default=400, help="Adam steps per student")
    parser.add_argument("--figure1_seeds", default="1 2 3", help="seeds (student start, policy) per strategy")
    return figure1(parser.parse_args(argv))


if __name__ == "__main__":
    cli(main, "figure1")
