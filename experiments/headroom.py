"""Headroom: a constructed task family where a schedule of alpha beats every fixed alpha, and what
ARKD, its controls and its signal options find there (docs/headroom.md: pre-registration, results).

    OMP_NUM_THREADS=1 python -m experiments.headroom select --out runs/headroom   # best fixed alpha and schedule
    OMP_NUM_THREADS=1 python -m experiments.headroom arms --out runs/headroom     # every arm, fresh seeds, the report

The task: over an ordered vocabulary of 64 tokens, context c (features x_c in R^3) has a teacher with
two modes of width 2.5: a minor one (mass 1 - w_c) near token 16 and a major one (w_c in [0.6, 0.8])
near token 44, both shifted by 4 x_c . d (d: the seed's direction). The student is one discretised
Gaussian with mean 16 + 8 theta_mu . [x_c, 1] and width 2.5 exp(theta_s . [x_c, 1]), theta shared by
all contexts, starting at 0: on the minor mode. RKL keeps it there (a local optimum); FKL moves it
toward the mixture's mean and widens it; RKL from there falls into the major mode. A step is Adam on
the mean loss of B contexts drawn from 256 (the noise: B = 32 or 4), the learning rate warmed up then
cosine (arkd.cosine_lr). The metric is the final RKL on 256 held-out contexts of the same seed.
Every run is a row of one tensor: all arms of all seeds step together.
"""
import argparse
import json
import math
import os
import statistics

import torch
from scipy import stats

from arkd import cosine_lr
from losses import entropy, forward_kl, reverse_kl, top1_agreement
from policy import ARKDPolicy, RunningNorm, immediate_reward, make_state
from experiments import cli

VOCAB, FEATURES, CONTEXTS, LR, BETAS, EPS = 64, 3, 256, 0.1, (0.9, 0.999), 1e-8
HORIZONS, NOISE = (1000, 4000), (32, 4)          # steps; contexts per step
SELECTION_SEEDS, FRESH_SEEDS = tuple(range(1001, 1006)), tuple(range(1, 17))
GRID = tuple(round(0.05 * i, 2) for i in range(21))
SWITCHES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)          # schedules: alpha 1 for this share of the steps, then 0
ORACLE_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def lookahead_alpha(alpha, dot, norm_objective, norm_direction, step_size):
    """alpha_t = clip(alpha_{t-1} + eta * dot / (|g_J| |u|), 0, 1): one step of hypergradient descent (ours,
    docs/method.md 9). The step's gradient is g_RKL + alpha u, u = g_FKL - g_RKL; after a step along it,
    dJ(theta_t) / d alpha_{t-1} = -lr g_J(theta_t) . u_{t-1} for J = FKL + RKL (Baydin et al. 2018).
    dot = g_J . u; the cosine makes the move eta at most, free of scale."""
    if norm_objective == 0 or norm_direction == 0:
        return alpha
    return min(max(alpha + step_size * dot / (norm_objective * norm_direction), 0.0), 1.0)



class SignalPolicy(ARKDPolicy):
    """ARKD's policy with two signal options (docs/method.md 3; in policy.py until 29d4e11): an action's
    return is its reward plus the next horizon - 1; advantage="fixed_scale" divides the centred returns
    by the spread of the first 32 returns (then frozen) instead of whitening each update's, so that a
    window of weak signal makes a small update."""

    def __init__(self, horizon=1, advantage="whitened", **kwargs):
        if horizon < 1 or advantage not in ("whitened", "fixed_scale"):
            raise ValueError(f"horizon must be >= 1, advantage whitened or fixed_scale; got {horizon}, {advantage!r}")
        super().__init__(**kwargs)
        self.horizon, self.advantage, self.open, self.return_norm = horizon, advantage, [], RunningNorm(1)

    def store_reward(self, reward):
        """The reward joins the returns of the horizon - 1 actions before it; an action becomes a transition
        once its return is complete."""
        if self.pending is None or not math.isfinite(reward):
            raise ValueError(f"store_reward needs a pending action and a finite reward, got {reward}")
        self.open.append((*self.pending, []))
        for _, _, rewards in self.open:
            rewards.append(float(reward))
        while self.open and len(self.open[0][2]) == self.horizon:
            norm_state, alpha, rewards = self.open.pop(0)
            self.transitions.append((norm_state, alpha, sum(rewards)))
            self.return_norm.update(torch.tensor([sum(rewards)]))
        self.pending, self.last_reward = None, float(reward)
        return len(self.transitions) >= self.buffer_size

    def advantages(self, centred):
        if self.advantage == "whitened":
            return super().advantages(centred)
        return centred / math.sqrt(float(self.return_norm.m2[0]) / self.return_norm.count + 1e-8)


def make_task(seed):
    """(training contexts [C, 4], held-out contexts [C, 4], teacher log-probs of each [C, V], targets [C])."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(FEATURES, generator=g, dtype=torch.float64), dim=0)
    v = torch.arange(VOCAB, dtype=torch.float64)
    out = []
    for _ in range(2):
        x = torch.randn(CONTEXTS, FEATURES, generator=g, dtype=torch.float64)
        shift, major = 4 * (x @ direction), 0.6 + 0.2 * torch.rand(CONTEXTS, generator=g, dtype=torch.float64)
        bumps = [torch.log_softmax(-(v - (m + shift).unsqueeze(1)) ** 2 / (2 * 2.5 ** 2), -1) for m in (16, 44)]
        log_p = torch.logaddexp(bumps[0] + (1 - major).log().unsqueeze(1), bumps[1] + major.log().unsqueeze(1))
        out += [torch.cat([x, torch.ones(CONTEXTS, 1, dtype=torch.float64)], 1), log_p]
    targets = torch.multinomial(out[1].exp(), 1, generator=g).squeeze(1)           # a "reference" token per context
    return out[0], out[2], out[1], out[3], targets


def student_logits(theta, x):
    """theta [R, 2, 4], x [R, B, 4] -> logits [R, B, V] of one discretised Gaussian per (run, context)."""
    mean = 16 + 8 * (x * theta[:, None, 0]).sum(-1, keepdim=True)
    width = 2.5 * (x * theta[:, None, 1]).sum(-1, keepdim=True).exp()
    return -(torch.arange(VOCAB, dtype=x.dtype) - mean) ** 2 / (2 * width ** 2)


def divergences(theta, x, log_p):
    s = student_logits(theta, x)
    return forward_kl(s, log_p).mean(-1), reverse_kl(s, log_p).mean(-1)           # [R] each


def akl_by_sort(q, p, mu=0.5):
    """losses.akl_alpha's weight through a full sort: over 64 tokens cheaper than its linear-time search,
    whose histogram has 8192 bins a row whatever the vocabulary."""
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    in_head = (sorted_p.cumsum(-1) <= mu) | (torch.arange(p.shape[-1]) == 0)
    err = (p - q).abs()
    return torch.where(err.sum(-1) > 0, (err.gather(-1, order) * in_head).sum(-1) / err.sum(-1).clamp_min(1e-300), 0.5)


def state_means(theta, x, log_p, targets):
    """The ARKD state's statistics per run (token means over the batch), as kd_pass would give them."""
    s = student_logits(theta, x)
    return [{"fkl": float(f), "rkl": float(r), "teacher_entropy": float(ht), "student_entropy": float(hs),
             "akl_alpha": float(a), "top1_agreement": float(t), "student_ce": float(ce)} for f, r, ht, hs, a, t, ce in zip(
        *(z.mean(-1) for z in (forward_kl(s, log_p), reverse_kl(s, log_p), entropy(log_p), entropy(s),
                               akl_by_sort(s.softmax(-1), log_p.exp()), top1_agreement(s, log_p),
                               -torch.log_softmax(s, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1))))]


def adam_step(theta, grad, m, v, step, lr):
    """One Adam step on every row at once (elementwise: the rows stay independent); returns the new (theta, m, v)."""
    m, v = BETAS[0] * m + (1 - BETAS[0]) * grad, BETAS[1] * v + (1 - BETAS[1]) * grad ** 2
    m_hat, v_hat = m / (1 - BETAS[0] ** (step + 1)), v / (1 - BETAS[1] ** (step + 1))
    return theta - lr * m_hat / (v_hat.sqrt() + EPS), m, v


def run_arms(arms, seeds, steps, batch):
    """Trains one row per (seed, arm) for `steps` steps; returns {arm: [final held-out RKL per seed]},
    {arm: [mean alpha per seed]} and {ARKD arm: REINFORCE updates (its last seed's)}. An arm is ("fixed", a),
    ("fixed_at", [a per seed]), ("switch", share), ("arkd", options), ("lookahead", "none" | "adam") or
    ("oracle", None). The trainer's choices, in a toy's terms: the reward on the same batch after the step
    (or the next batch), the state's statistics from the step's batch, the lookahead from g_J of this batch."""
    tasks = [make_task(s) for s in seeds]
    rows = [(i, arm) for i in range(len(seeds)) for arm in arms]
    seed_of = torch.tensor([i for i, _ in rows])
    x_train, x_test, p_train, p_test, targets = (torch.stack([t[k] for t in tasks])[seed_of] for k in range(5))
    order = torch.stack([torch.randint(CONTEXTS, (steps + 1, batch), generator=torch.Generator().manual_seed(s))
                         for s in seeds])[seed_of]                                   # [R, steps + 1, B]
    theta = torch.zeros(len(rows), 2, FEATURES + 1, dtype=torch.float64)
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    policies = {r: SignalPolicy(seed=seeds[i], lr=0.0 if opt.get("lr0") else 3e-3, horizon=opt.get("horizon", 1),
                                advantage=opt.get("advantage", "whitened"))
                for r, (i, (kind, opt)) in enumerate(rows) if kind == "arkd"}
    looks = {r: [0.5, None] for r, (_, (kind, _)) in enumerate(rows) if kind == "lookahead"}
    oracle = [r for r, (_, (kind, _)) in enumerate(rows) if kind == "oracle"]
    alpha_sum, warmup = torch.zeros(len(rows), dtype=torch.float64), int(0.05 * steps)

    def batch_of(k):
        idx = order[:, k]
        pick = lambda t: t.gather(1, idx.view(*idx.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))
        return pick(x_train), pick(p_train), pick(targets)

    for k in range(steps):
        lr = LR * cosine_lr(k, steps, warmup)
        x, log_p, tgt = batch_of(k)
        x_next, log_p_next, _ = batch_of(k + 1)
        theta_ = theta.detach().requires_grad_(True)
        fkl, rkl = divergences(theta_, x, log_p)
        g_fkl, = torch.autograd.grad(fkl.sum(), theta_, retain_graph=True)
        g_rkl, = torch.autograd.grad(rkl.sum(), theta_)
        alpha = torch.zeros(len(rows), dtype=torch.float64)
        ids = list(policies)
        means = state_means(theta[ids], x[ids], log_p[ids], tgt[ids]) if ids else []
        for r, (_, (kind, value)) in enumerate(rows):
            if kind in ("fixed", "fixed_at"):           # fixed_at: one alpha per seed (ARKD's own mean)
                alpha[r] = value if kind == "fixed" else value[rows[r][0]]
            elif kind == "switch":
                alpha[r] = 1.0 if k < value * steps else 0.0
        for (r, policy), before in zip(policies.items(), means):
            alpha[r] = policy.act(make_state(before, k / steps, policy.last_alpha, policy.last_reward))
        for r, look in looks.items():
            if look[1] is not None:                  # g_J of this batch against the last step's (kept) direction
                g_j, u = (g_fkl + g_rkl)[r], look[1]
                look[0] = lookahead_alpha(look[0], float((g_j * u).sum()), float(g_j.norm()), float(u.norm()), 0.05)
            alpha[r] = look[0]
        if oracle:
            alpha[oracle] = myopic_alpha(theta[oracle], g_fkl[oracle], g_rkl[oracle], m[oracle], v[oracle], k, lr,
                                         x_next[oracle], log_p_next[oracle])
        grad = alpha.view(-1, 1, 1) * g_fkl + (1 - alpha.view(-1, 1, 1)) * g_rkl
        for r, look in looks.items():                # u = g_FKL - g_RKL, through Adam's preconditioning if asked
            u = g_fkl[r] - g_rkl[r]
            look[1] = u / ((v[r] / (1 - BETAS[1] ** k)).sqrt() + EPS) if rows[r][1][1] == "adam" and k else u
        new_theta, m, v = adam_step(theta, grad, m, v, k, lr)
        if ids:                                      # the reward: the same batch after the step, or the next one
            nxt = torch.tensor([bool(rows[r][1][1].get("next")) for r in ids]).view(-1, 1, 1)
            xs, ps = torch.where(nxt, x_next[ids], x[ids]), torch.where(nxt, log_p_next[ids], log_p[ids])
            before, after = divergences(theta[ids], xs, ps), divergences(new_theta[ids], xs, ps)
            for j, policy in enumerate(policies.values()):
                if policy.store_reward(immediate_reward(*(float(d[j]) for d in before + after))):
                    policy.update()
        theta, alpha_sum = new_theta, alpha_sum + alpha
    final = reverse_kl(student_logits(theta, x_test), p_test).mean(-1)
    results, mean_alpha = {}, {}
    for r, (i, arm) in enumerate(rows):
        results.setdefault(arm_name(arm), []).append(float(final[r]))
        mean_alpha.setdefault(arm_name(arm), []).append(float(alpha_sum[r]) / steps)
    updates = {arm_name(rows[r][1]): p.updates for r, p in policies.items()}
    return results, mean_alpha, updates


def myopic_alpha(theta, g_fkl, g_rkl, m, v, k, lr, x_next, log_p_next):
    """Per row, the alpha of ORACLE_GRID whose Adam step gives the largest ARKD reward on the next batch."""
    f0, r0 = divergences(theta, x_next, log_p_next)
    best = torch.full((len(theta),), -math.inf, dtype=torch.float64)
    choice = torch.zeros(len(theta), dtype=torch.float64)
    for a in ORACLE_GRID:
        trial, _, _ = adam_step(theta, a * g_fkl + (1 - a) * g_rkl, m, v, k, lr)
        f1, r1 = divergences(trial, x_next, log_p_next)
        reward = (f0 - f1) / f0.clamp_min(1e-8) + (r0 - r1) / r0.clamp_min(1e-8)
        choice = torch.where(reward > best, a, choice)
        best = torch.maximum(best, reward)
    return choice


def arm_name(arm):
    kind, value = arm
    if kind == "fixed_at":
        return "fixed-at-arkd-mean"
    if kind == "arkd":      # {"lr0": True} -> arkd-lr0, {"horizon": 10} -> arkd-horizon10, {"advantage": "x"} -> arkd-x
        return "arkd" + "".join(f"-{k}" if v is True else f"-{v}" if isinstance(v, str) else f"-{k}{v}"
                                for k, v in sorted(value.items()))
    return f"{kind}" + ("" if value in (None, "none") else f"-{value}")


ARKD_ARMS = ({}, {"lr0": True}, {"next": True}, {"horizon": 10}, {"advantage": "fixed_scale"})


def select(out):
    """The best fixed alpha (the grid, then +-0.01..0.03 around its best) and the best switch, per
    horizon and noise, on the selection seeds; written to OUT/selection.json before any arm runs."""
    chosen = {}
    for steps in HORIZONS:
        for batch in NOISE:
            mean = lambda res: {k: statistics.fmean(v) for k, v in res.items()}
            grid = mean(run_arms([("fixed", a) for a in GRID] + [("switch", s) for s in SWITCHES], SELECTION_SEEDS,
                                 steps, batch)[0])
            best = min(GRID, key=lambda a: grid[arm_name(("fixed", a))])
            fine = sorted({round(min(max(best + d, 0.0), 1.0), 2) for d in (-0.03, -0.02, -0.01, 0.01, 0.02, 0.03)} - {best})
            grid.update(mean(run_arms([("fixed", a) for a in fine], SELECTION_SEEDS, steps, batch)[0]))
            chosen[f"{steps}x{batch}"] = {
                "best_fixed": min(GRID + tuple(fine), key=lambda a: grid[arm_name(("fixed", a))]), "fine": fine,
                "best_switch": min(SWITCHES, key=lambda s: grid[arm_name(("switch", s))]), "selection_means": grid}
            print(steps, batch, {k: v for k, v in chosen[f"{steps}x{batch}"].items() if k != "selection_means"}, flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "selection.json"), "w") as f:
        json.dump(chosen, f, indent=1)


def analyse(results, best_fixed, schedule, updates):
    """Verification of the headroom and every arm against the best fixed alpha, paired by seed:
    Bonferroni-simultaneous 95% t intervals, Holm-adjusted p-values, the share of the schedule's gain."""
    n = len(results[schedule])
    fixed = [k for k in results if k.startswith("fixed-") and k != "fixed-at-arkd-mean"]
    margins = [min(results[f][i] for f in fixed) - results[schedule][i] for i in range(n)]
    base = results[best_fixed]
    gain = statistics.fmean(b - s for b, s in zip(base, results[schedule]))
    verified = {"beats_every_fixed_on_every_seed": min(margins) > 0,
                "smallest_margin_share": min(m / min(results[f][i] for f in fixed) for i, m in enumerate(margins)),
                "gap_in_seed_sds": gain / statistics.stdev(b - s for b, s in zip(base, results[schedule]))}
    arms = [k for k in results if k not in fixed or k == "fixed-at-arkd-mean"]
    arms = [k for k in arms if k != best_fixed]
    m, rows, pvalues = len(arms), {}, {}
    t_crit, t_power = stats.t.ppf(1 - 0.025 / m, n - 1), stats.t.ppf(0.8, n - 1)
    for k in arms:
        diff = [a - b for a, b in zip(results[k], base)]
        mean_diff, sd = statistics.fmean(diff), statistics.stdev(diff)
        se = sd / math.sqrt(n)
        pvalues[k] = 2 * stats.t.sf(abs(mean_diff) / se, n - 1) if se > 0 else float(mean_diff == 0)
        rows[k] = {"mean": statistics.fmean(results[k]), "minus_best_fixed": mean_diff, "half_width": t_crit * se,
                   "detectable_at_80": (t_crit + t_power) * se, "share_of_gain": -mean_diff / gain if gain else None,
                   "updates": updates.get(k)}
    running = 0.0                                   # Holm: the i-th smallest p times (m - i), kept monotone
    for i, k in enumerate(sorted(pvalues, key=pvalues.get)):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        rows[k]["p_holm"] = running
    arkd, holds = rows["arkd"], (verified["beats_every_fixed_on_every_seed"] and verified["smallest_margin_share"] >= 0.1
                                 and verified["gap_in_seed_sds"] >= 10)
    verdict = "none (headroom not verified)" if not holds else ("positive" if arkd["minus_best_fixed"] + arkd["half_width"] < 0 and arkd["share_of_gain"] >= 0.5 else
               "negative" if arkd["share_of_gain"] < 0.2 and (arkd["updates"] or 0) >= 500 else "inconclusive")
    return {"verified": verified, "gain": gain, "arms": rows, "verdict": verdict}


def run_all(out):
    with open(os.path.join(out, "selection.json")) as f:
        chosen = json.load(f)
    report = {}
    for steps in HORIZONS:
        for batch in NOISE:
            pick = chosen[f"{steps}x{batch}"]
            arms = ([("fixed", a) for a in GRID + tuple(pick["fine"])] + [("switch", pick["best_switch"])]
                    + [("arkd", o) for o in ARKD_ARMS] + [("lookahead", "none"), ("lookahead", "adam"), ("oracle", None)])
            results, alphas, updates = run_arms(arms, FRESH_SEEDS, steps, batch)
            more, more_alphas, _ = run_arms([("fixed_at", alphas["arkd"])], FRESH_SEEDS, steps, batch)
            results.update(more)
            best, schedule = arm_name(("fixed", pick["best_fixed"])), arm_name(("switch", pick["best_switch"]))
            report[f"{steps}x{batch}"] = {"best_fixed": best, "schedule": schedule, "results": results,
                                          "mean_alpha": {**alphas, **more_alphas},
                                          **analyse(results, best, schedule, updates)}
            print(steps, batch, report[f"{steps}x{batch}"]["verified"], report[f"{steps}x{batch}"]["verdict"], flush=True)
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(report, f, indent=1)
    write_report(report, os.path.join(out, "report.md"))


def write_report(report, path):
    lines = []
    for config, r in report.items():
        steps, batch = config.split("x")
        v = r["verified"]
        lines += [f"### {steps} steps, {batch} contexts per step", "",
                  f"Headroom ({r['schedule']} against every fixed alpha, fresh seeds): beats every one on every seed: "
                  f"{v['beats_every_fixed_on_every_seed']}; smallest margin {100 * v['smallest_margin_share']:.0f}% of the "
                  f"best fixed value; gap {v['gap_in_seed_sds']:.1f} seed SDs. Best fixed (chosen on the selection seeds): "
                  f"{r['best_fixed']}, mean {statistics.fmean(r['results'][r['best_fixed']]):.3f}. Verdict on ARKD: "
                  f"**{r['verdict']}**.", "",
                  "| arm | final RKL | minus best fixed (Bonferroni 95%) | Holm p | detectable at 80% | share of the "
                  "schedule's gain | mean alpha | policy updates |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, a in r["arms"].items():
            alpha = statistics.fmean(r["mean_alpha"][k]) if k in r["mean_alpha"] else float("nan")
            lines.append(f"| {k} | {a['mean']:.3f} | {a['minus_best_fixed']:+.3f} +- {a['half_width']:.3f} | "
                         f"{a['p_holm']:.2g} | {a['detectable_at_80']:.3f} | {a['share_of_gain']:+.2f} | {alpha:.2f} | "
                         f"{a['updates'] if a['updates'] is not None else ''} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description="The headroom experiment (docs/headroom.md).")
    commands = p.add_subparsers(dest="command", required=True)
    for name, text in (("select", "the best fixed alpha and schedule on the selection seeds (OUT/selection.json)"),
                       ("arms", "every arm on fresh seeds (OUT/results.json, OUT/report.md)")):
        commands.add_parser(name, help=text).add_argument("--out", required=True, help="the experiment's folder")
    args = p.parse_args(argv)
    select(args.out) if args.command == "select" else run_all(args.out)


if __name__ == "__main__":
    cli(main, "headroom")
