"""The ARKD policy: state features, Beta policy network, immediate reward, REINFORCE.

Section 3 of docs/method.md, with torch and the standard library only, so this file can be copied
into any trainer. At every optimizer step k (or every `reward_every` steps):

1. the trainer builds the state s_k (make_state: 10 features of how teacher and student differ,
   from statistics it already has, summed over ranks so every rank sees the same vector);
2. the policy samples the FKL weight alpha_k ~ Beta(a(s_k), b(s_k)) (act; rank 0 samples and
   broadcasts) and the trainer minimises alpha_k FKL + (1 - alpha_k) RKL for one step;
3. the trainer measures the immediate reward r_k = (FKL - FKL') / FKL + (RKL - RKL') / RKL, the
   relative progress of both directions on the same batch (immediate_reward), and hands it back
   (store_reward), which pairs it with the action alpha_k that caused it;
4. every M actions REINFORCE updates the network: A_i = (r_i - mean r) / std r over the M stored
   rewards, loss = -mean(A_i log pi(alpha_i | s_i)) - c_H mean(entropy), one Adam step with the
   gradient norm clipped. log pi is recomputed for the stored (s_i, alpha_i) with the current
   parameters. The README's loop shows the four in a trainer of your own.

Our choices where the paper is vague (listed in docs/method.md; each marked "Choice X" where it is made):
P1. The normaliser sees each state before normalising it; transitions store the normalised state.
P2. The baseline is the mean reward of the M stored transitions (it also removes what the step size adds).
P3. Sampled alpha is clipped to [1e-6, 1 - 1e-6], where log pi of the Beta is finite.
P4. The reward divides by max(KL, 1e-8): a student equal to its teacher gives 0, not NaN.
P5. The policy samples from its own random stream (in its state_dict): a resumed run samples the same.
P6. All ranks run the same update; rank 0's parameters are then broadcast: the policies never drift.
P7. Defaults M = 8, Adam lr 3e-3, c_H = 0.1, chosen on synthetic bandits (docs/method.md 3).
P8. Normaliser statistics from the first 32 states, then frozen; only the reward is standardised.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

FEATURE_NAMES = ("log_fkl", "log_rkl", "teacher_entropy", "student_entropy", "akl_alpha",
                 "top1_agreement", "student_ce", "progress", "prev_alpha", "prev_reward")
ALPHA_EPS = 1e-6
KL_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Distributed helpers: every function is the identity in a single process.


def _distributed():
    return dist.is_available() and dist.is_initialized()


def _collective(tensor, op):
    """op(buffer) on a copy of `tensor` on the communication device (NCCL moves CUDA tensors, gloo CPU
    ones): a new tensor on tensor's device."""
    if not _distributed():
        return tensor.clone()
    cuda = dist.get_backend() == "nccl"
    buffer = tensor.detach().to(torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu", copy=True)
    op(buffer)
    return buffer.to(tensor.device)


def all_reduce_sum(tensor):
    """Sum of `tensor` over all ranks (a new tensor on tensor's device)."""
    return _collective(tensor, dist.all_reduce)


def broadcast_from_rank0(tensor):
    """Rank 0's value of `tensor` on every rank (a new tensor on tensor's device)."""
    return _collective(tensor, lambda buffer: dist.broadcast(buffer, src=0))


# ----------------------------------------------------------------------------------------------
# State and reward


def make_state(means, progress, prev_alpha, prev_reward):
    """The 10 state features of docs/method.md section 3 -> float32 [10] (order: FEATURE_NAMES).

    means: token means of the step's statistics with the keys fkl, rkl, teacher_entropy,
    student_entropy, akl_alpha, top1_agreement, student_ce (losses.stat_means gives them).
    KLs enter as log(max(KL, 1e-8)): they span decades during training.
    """
    if not isinstance(means, dict):
        raise ValueError(f"make_state: means must be the dict losses.stat_means(stats) gives, got {type(means).__name__}")
    names = ("fkl", "rkl", "teacher_entropy", "student_entropy", "akl_alpha", "top1_agreement", "student_ce")
    missing = [k for k in names if k not in means]
    if missing:
        raise ValueError(f"make_state: missing statistics {missing}")
    causes = {"akl_alpha": "run kd_pass with akl=True for the state's batch", "student_ce": "pass kd_pass target_ids"}
    for name in names:
        if not math.isfinite(means[name]):
            raise ValueError(f"make_state: {name} is {means[name]}" + (f": {causes[name]}" if name in causes else ""))
    if not (0 <= progress <= 1 and 0 <= prev_alpha <= 1 and math.isfinite(prev_reward)):
        raise ValueError(f"make_state: progress and prev_alpha must lie in [0, 1], prev_reward be finite; got "
                         f"{progress}, {prev_alpha}, {prev_reward}")
    values = [math.log(max(means["fkl"], KL_EPS)), math.log(max(means["rkl"], KL_EPS)),
              means["teacher_entropy"], means["student_entropy"], means["akl_alpha"],
              means["top1_agreement"], means["student_ce"], progress, prev_alpha, prev_reward]
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def immediate_reward(fkl, rkl, fkl_after, rkl_after):
    """r_k = (FKL - FKL') / FKL + (RKL - RKL') / RKL (docs/method.md section 3).

    FKL, RKL: mean divergences on micro-batch 0 before the optimizer step; FKL', RKL': the same
    batch and teacher logits after it. Relative progress on the long tail plus relative progress
    on the principal modes: scale-free, high only when both directions improve. (Choice P4)
    """
    return (fkl - fkl_after) / max(fkl, KL_EPS) + (rkl - rkl_after) / max(rkl, KL_EPS)


# How each feature is normalised (Choice P8): bounded ones lie in [0, 1] by definition and map to
# 2x - 1; log-KLs, entropies and the CE (in nats, or log units: a factor e) are centred on their mean
# over the first states and not scaled, so that a trend stays visible in known units; the reward is
# standardised. The statistics of the first NORM_WARMUP states are then frozen.
FEATURE_KINDS = ("centred", "centred", "centred", "centred", "bounded",
                 "bounded", "centred", "bounded", "bounded", "standardised")
NORM_WARMUP = 32


class RunningNorm:
    """The state normaliser (Choice P8): mean and variance (Welford, float64) of the first `warmup` states,
    then frozen (of all history, they would chase every trend: progress would normalise to a constant);
    per feature: "bounded" 2x - 1, "centred" x - mean, "standardised" (x - mean) / std; clipped to +-5."""

    def __init__(self, size, kinds=None, warmup=NORM_WARMUP):
        kinds = kinds or ("standardised",) * size
        if len(kinds) != size or set(kinds) - {"bounded", "centred", "standardised"}:
            raise ValueError(f"kinds must name one of bounded, centred, standardised per feature, got {kinds}")
        self.count, self.warmup = 0, warmup
        self.bounded = torch.tensor([k == "bounded" for k in kinds])
        self.scaled = torch.tensor([k == "standardised" for k in kinds])
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def update(self, x):
        if self.count >= self.warmup:
            return
        x = x.double()
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def normalise(self, x):
        x = x.double()
        scale = torch.where(self.scaled, torch.sqrt(self.m2 / max(self.count, 1) + 1e-8), 1.0)
        z = torch.where(self.bounded, 2 * x - 1, (x - self.mean) / scale)
        return z.clamp(-5.0, 5.0).float()

    def state_dict(self):
        return {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state):
        self.count, self.mean, self.m2 = state["count"], state["mean"].clone(), state["m2"].clone()


# ----------------------------------------------------------------------------------------------
# The policy


class ARKDPolicy:
    """MLP 10 -> 64 -> 64 (tanh) -> (o1, o2); alpha ~ Beta(1 + softplus(o1), 1 + softplus(o2)).

    The last layer starts at zero: a = b = 1 + log 2, so alpha starts with mean 0.5 and a wide
    spread (the paper's early exploration). The policy lives on the CPU: it is tiny.
    """

    def __init__(self, n_features=len(FEATURE_NAMES), hidden=64, buffer_size=8, lr=3e-3,
                 entropy_coef=0.1, max_grad_norm=1.0, seed=0):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.n_features, self.buffer_size = n_features, buffer_size
        self.entropy_coef, self.max_grad_norm = entropy_coef, max_grad_norm     # Choice P7
        with torch.random.fork_rng(devices=[]):    # seeded, and the global RNG is left alone
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
            self.rng_state = torch.get_rng_state()  # Choice P5: the policy's own sampling stream
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.norm = RunningNorm(n_features, FEATURE_KINDS if n_features == len(FEATURE_NAMES) else None)
        self.transitions = []                      # [(normalised state, alpha, reward)], < M
        self.pending = None                        # (normalised state, alpha) awaiting its reward
        self.last_alpha, self.last_reward = 0.5, 0.0
        self.last_beta = (1 + math.log(2), 1 + math.log(2))
        self.updates = 0

    def distribution(self, norm_states):
        """Beta(a, b) for normalised states [..., n_features]."""
        out = self.net(norm_states)
        return torch.distributions.Beta(1 + F.softplus(out[..., 0]), 1 + F.softplus(out[..., 1]))

    def _check(self, state):
        state = torch.as_tensor(state, dtype=torch.float32)
        if state.shape != (self.n_features,):
            raise ValueError(f"state must have shape ({self.n_features},), got {tuple(state.shape)}")
        if not torch.isfinite(state).all():
            raise ValueError(f"state has non-finite values: {state.tolist()}")
        return state

    @torch.no_grad()
    def act(self, state):
        """Samples alpha for `state` [n_features] (the same on every rank) and remembers the pair."""
        if self.pending is not None:
            raise RuntimeError("act() called twice without store_reward(): each action needs its reward")
        state = self._check(state)
        self.norm.update(state)                                  # Choice P1
        norm_state = self.norm.normalise(state)
        beta = self.distribution(norm_state)
        alpha = torch.zeros(())
        if not _distributed() or dist.get_rank() == 0:     # one sample, shared: ranks train with the same alpha
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.rng_state)
                alpha = beta.sample()
                self.rng_state = torch.get_rng_state()
        alpha = float(broadcast_from_rank0(alpha).clamp(ALPHA_EPS, 1 - ALPHA_EPS))   # Choice P3
        self.pending = (norm_state, alpha)
        self.last_alpha = alpha
        self.last_beta = (float(beta.concentration1), float(beta.concentration0))
        return alpha

    @torch.no_grad()
    def mean_alpha(self, state):
        """The deterministic alpha a / (a + b) for `state`, for evaluating the learned schedule."""
        return float(self.distribution(self.norm.normalise(self._check(state))).mean)

    def store_reward(self, reward):
        """Pairs `reward` (the same on every rank) with the pending action; True when M transitions are
        stored: then run update()."""
        if self.pending is None:
            raise RuntimeError("store_reward() called without a pending act()")
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        self.transitions.append((*self.pending, float(reward)))
        self.pending, self.last_reward = None, float(reward)
        return len(self.transitions) >= self.buffer_size

    def drop_action(self):
        """Forgets the pending action without a reward (its step was not finite)."""
        self.pending = None

    def update(self):
        """One REINFORCE step on the stored transitions; returns its diagnostics."""
        states = torch.stack([s for s, _, _ in self.transitions])                  # (M, n)
        alphas = torch.tensor([a for _, a, _ in self.transitions])                 # (M,)
        rewards = torch.tensor([r for _, _, r in self.transitions], dtype=torch.float64)
        baseline = float(rewards.mean())                                            # Choice P2
        advantages = self.advantages(rewards - baseline)
        beta = self.distribution(states)    # log pi with the current parameters
        entropy = beta.entropy().mean()
        loss = -(advantages.float() * beta.log_prob(alphas)).mean() - self.entropy_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if _distributed():                  # Choice P6
            with torch.no_grad():
                for p in self.net.parameters():
                    p.copy_(broadcast_from_rank0(p))
        self.transitions.clear()
        self.updates += 1
        return {"policy_loss": float(loss.detach()), "policy_entropy": float(entropy.detach()),
                "policy_grad_norm": float(grad_norm), "baseline": baseline}

    def advantages(self, centred):
        """Whitened from 4 stored rewards on: an update's size does not follow the reward's scale."""
        return centred / (centred.std() + 1e-8) if len(centred) >= 4 else centred

    def state_dict(self):
        """Everything a resumed run needs to continue exactly."""
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "norm": self.norm.state_dict(), "rng_state": self.rng_state.clone(),
                "transitions": [(s.clone(), a, r) for s, a, r in self.transitions],
                "pending": None if self.pending is None else (self.pending[0].clone(), self.pending[1]),
                "last_alpha": self.last_alpha,
                "last_reward": self.last_reward, "last_beta": self.last_beta, "updates": self.updates}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))   # never share moments
        self.norm.load_state_dict(state["norm"])
        self.rng_state = state["rng_state"].clone()
        self.transitions = [(s.clone(), a, r) for s, a, r in state["transitions"]]
        self.pending = None if state["pending"] is None else (state["pending"][0].clone(), state["pending"][1])
        self.last_alpha, self.last_reward = state["last_alpha"], state["last_reward"]
        self.last_beta, self.updates = tuple(state["last_beta"]), state["updates"]
