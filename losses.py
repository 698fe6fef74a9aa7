"""Token-level divergences, AKL weights and the chunked KD pass of ARKD.

Sections 1 and 2 of docs/method.md, with torch and the standard library only, so this file can be
copied into any trainer. Teacher p, student q, response position t:

    p_t = softmax(z_teacher_t / tau)        q_t = softmax(z_student_t / tau)
    FKL_t = sum_v p_t(v) (log p_t(v) - log q_t(v))      forward KL(p || q), mean-seeking
    RKL_t = sum_v q_t(v) (log q_t(v) - log p_t(v))      reverse KL(q || p), mode-seeking
    L_KD  = alpha * FKL + (1 - alpha) * RKL

Public API: the plain definitions forward_kl, reverse_kl, entropy, top1_agreement, akl_alpha (Wu et
al. 2024), ATKD's atkd_easy and atkd_loss (Zhong et al. 2024); kd_pass, the one chunked pass
training uses (closed-form gradients, the policy's statistics); the strategies (parse_strategy,
strategy_alpha, STEP_RULES); a cached teacher (teacher_summary, cached_teacher_logits); response_targets.

Our choices where the paper is vague (listed in docs/method.md; each marked "Choice X" where it is made):
L1. Log-probabilities are floored at LOG_FLOOR = -1e4: 0 * log 0 is 0 without a branch, and a token
   one side rules out with a -inf logit costs a large finite penalty, not inf / NaN (finite fp32 rows
   never reach the floor).
L2. The policy's entropies and the AKL weights use the same temperature tau as the divergences.
L3. The student cross-entropy (an optional loss term, and policy feature 7) is at tau = 1.
L4. Statistics are summed in float64 with a token count: they add exactly over micro-batches and
   ranks; a mean over zero tokens is 0, never NaN.
L5. Top-1 agreement is 1 where some token is a maximum of both models (a tie on either side counts).
"""
import math
from dataclasses import dataclass

import torch

LOG_FLOOR = -1e4
IGNORE_INDEX = -100
# Sums returned by kd_pass, in this order ("tokens" is the count the others are divided by).
STAT_NAMES = ("tokens", "fkl", "rkl", "teacher_entropy", "student_entropy",
              "akl_alpha", "top1_agreement", "student_ce")
STRATEGY_NAMES = "fkl, rkl, fixed:A, linear:A0,A1, greedy, akl, arkd, atkd, jsd:B, tvd, skl:A, srkl:A, ab:A,B"


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_tau(tau, mu=0.5):
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0 and isinstance(mu, (int, float)) and 0 < mu < 1):
        raise ValueError(f"tau must be a finite number > 0 and mu lie in (0, 1), got tau={tau!r}, mu={mu!r}")


def _check_divergence(kind, c):
    # jsd at 0 or 1 is 0 (TRL then switches to FKL or RKL: use those); a skew of 1 makes m = p (or q).
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")
    if kind == "ab" and not (len(c) == 2 and min(c) >= 0 and sum(c) > 0 and all(map(math.isfinite, c))):
        raise ValueError(f"divergence ab: (a, b) = {c} must have a, b >= 0 and a + b > 0 (Choice 8.2)")
    if (kind == "jsd" and not 0 < c < 1) or (kind in ("skl", "srkl") and not 0 <= c < 1):
        raise ValueError(f"divergence {kind}: coefficient {c} must lie in (0, 1) for jsd, [0, 1) for skl and srkl")


def _cut_vocab(student_logits, teacher_logits, vocab_size=None):
    """Checks the pair and drops padded vocabulary columns: [..., V_s], [..., V_t] -> [..., V]."""
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if vocab_size is None:
        if s_shape != t_shape:
            raise ValueError(f"student logits {s_shape} and teacher logits {t_shape} differ in shape; "
                             "if only the vocabulary is padded, pass vocab_size=<real vocabulary>")
        return student_logits, teacher_logits
    if s_shape[:-1] != t_shape[:-1] or min(s_shape[-1], t_shape[-1]) < vocab_size or vocab_size < 1:
        raise ValueError(f"student logits {s_shape} and teacher logits {t_shape} cannot be compared "
                         f"on a vocabulary of {vocab_size}")
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def _compute_dtype(dtype):
    """fp32 at least (bf16 / fp16 logits are upcast), fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# Plain definitions (small inputs, autograd)


def log_probs(logits, tau=1.0):
    """log softmax(logits / tau) in at least fp32, floored at LOG_FLOOR (Choice L1). [..., V]."""
    _check_tau(tau)
    z = logits.to(_compute_dtype(logits.dtype)) / tau
    return torch.log_softmax(z, dim=-1).clamp_min(LOG_FLOOR)


def forward_kl(student_logits, teacher_logits, tau=1.0, vocab_size=None):
    """FKL_t = tau^2 sum_v p(v) (log p(v) - log q(v)), p teacher, q student: [..., V] x [..., V] -> [...]."""
    student_logits, teacher_logits = _cut_vocab(student_logits, teacher_logits, vocab_size)
    log_q, log_p = log_probs(student_logits, tau), log_probs(teacher_logits, tau)
    return tau ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl(student_logits, teacher_logits, tau=1.0, vocab_size=None):
    """RKL_t = tau^2 sum_v q(v) (log q(v) - log p(v)), p teacher, q student: [..., V] x [..., V] -> [...]."""
    student_logits, teacher_logits = _cut_vocab(student_logits, teacher_logits, vocab_size)
    log_q, log_p = log_probs(student_logits, tau), log_probs(teacher_logits, tau)
    return tau ** 2 * (log_q.exp() * (log_q - log_p)).sum(-1)


def entropy(logits, tau=1.0):
    """H_t = -sum_v p(v) log p(v), p = softmax(logits / tau) (Choice L2): policy features 3 and 4. [..., V] -> [...]."""
    log_p = log_probs(logits, tau)
    return -(log_p.exp() * log_p).sum(-1)


def top1_agreement(student_logits, teacher_logits):
    """1.0 where some token is a maximum of both models' logits (ties count: Choice L5), else 0.0: feature 6."""
    teacher_top = teacher_logits == teacher_logits.amax(-1, keepdim=True)
    return (teacher_top & (student_logits == student_logits.amax(-1, keepdim=True))).any(-1).to(torch.float32)


def atkd_easy(unc):
    """ATKD's easy tokens of one micro-batch: the teacher's uncertainty UNC = 1 - p(g) below the LOWER
    median of its response tokens (torch.median, as the authors; the hard group keeps the middle one): Choice A1."""
    return unc < unc.median() if len(unc) else torch.zeros_like(unc, dtype=torch.bool)


def atkd_loss(tckd_t, nckd_t, easy, lam=0.2):
    """Per-token ATKD loss: 2 lam NCKD on easy tokens, 2 (1 - lam) (TCKD + NCKD) on hard ones.

    Summed and divided by the step's token count (Choices T1, A2), this equals the authors' group-mean form
    lam mean_easy(NCKD) + (1 - lam) mean_hard(TCKD + NCKD) when the two groups are equal in size.
    """
    return torch.where(easy, 2 * lam * nckd_t, 2 * (1 - lam) * (tckd_t + nckd_t))


def _head_share(g_head, g_all):
    """g_head / (g_head + g_tail) per row, 0/0 (p == q) -> 0.5."""
    return torch.where(g_all > 0, g_head / g_all.clamp_min(torch.finfo(g_all.dtype).tiny), torch.full_like(g_all, 0.5))


def _akl_alpha(p, abs_err, mu):
    """g_head / (g_head + g_tail) [n] for p, abs_err = |p - q|: [n, V]. The head (akl_alpha; ties: the lower
    index first, as a stable sort) is found without sorting the vocabulary: where the top-1 alone exceeds
    mu it is the top-1; the other rows go through _head_error_by_bins, a few passes linear in V."""
    top_p = p.amax(-1)
    rows = (top_p <= mu).nonzero().squeeze(1)
    if len(rows) == len(p):                                      # a flat teacher: every row, no copy
        return _head_share(*_head_error_by_bins(p, abs_err, mu)).to(abs_err.dtype)
    g_head = abs_err.gather(1, _first_argmax(p, top_p).unsqueeze(1)).squeeze(1)   # the sort's top-1
    if len(rows):
        g_head[rows] = _head_error_by_bins(p[rows], abs_err[rows], mu)[0].to(g_head.dtype)
    return _head_share(g_head, abs_err.sum(-1))


def _first_argmax(x, x_max, block=1024):
    """The first index of each row's maximum x_max in x [n, V], as x.argmax(-1) gives it but faster on a
    CPU (where argmax is a slow reduction): the first block of `block` columns whose maximum is the
    row's, then the first index in that block."""
    whole = x.shape[1] // block * block
    maxima = [x[:, :whole].view(len(x), -1, block).amax(-1)] + ([x[:, whole:].amax(-1, keepdim=True)] if whole < x.shape[1] else [])
    first = (torch.cat(maxima, 1) == x_max.unsqueeze(1)).to(torch.uint8).argmax(-1)
    columns = (first.unsqueeze(1) * block + torch.arange(block, device=x.device)).clamp_max(x.shape[1] - 1)
    return first * block + (x.gather(1, columns) == x_max.unsqueeze(1)).to(torch.uint8).argmax(-1)


def _head_error_in_order(rows, cand, cand_err, mass_above, mu, dtype):
    """Per row of mass_above [m]: the sum of cand_err over its candidates (rows, cand: their row and p,
    float64) that belong to the head, taken in the stable descending order of p after the tokens above
    them (mass_above). A row's first candidate is its top-1 when nothing is above it."""
    m = len(mass_above)
    if len(rows) == 0:
        return torch.zeros(m, dtype=torch.float64, device=mass_above.device)
    # One stable sort: by row, then by p descending; ties keep nonzero's order, the lower column first.
    order = (2.0 * rows + (1.0 - cand)).sort(stable=True).indices
    rows, cand, cand_err = rows[order], cand[order], cand_err[order]
    counts = torch.bincount(rows, minlength=m)
    position = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]   # 0 for a row's first
    # Each row's cumulative mass in the sort's order, the tokens above first: [m, 1 + most candidates].
    running = torch.zeros(m, 1 + int(counts.max()), dtype=torch.float64, device=rows.device)
    running[:, 0] = mass_above
    running[rows, position + 1] = cand
    cumulative = running.cumsum(1)[rows, position + 1]
    in_head = (cumulative.to(dtype) <= mu) | ((position == 0) & (mass_above[rows] == 0))   # the top-1 always
    return torch.zeros(m, dtype=torch.float64, device=rows.device).index_add_(0, rows, cand_err * in_head)


AKL_BINS = 8192     # float32 bits >> 17 of p <= 1: its exponent and 6 mantissa bits (the sign is 0)


def _head_error_by_bins(p, abs_err, mu):
    """(g_head, g_all) per row of p, abs_err [m, V] (float64 [m] each): g_head sums |p - q| over
    exactly the stable sort's head, g_all over the whole row.

    A non-negative float's bits, read as an integer, order like the float, so their top bits are
    histogram bins in the order of p (each 1/64 of an octave wide). One weighted bincount of p
    and one of |p - q| per row find the boundary bin b, the last one where the mass counted from the
    top still exceeds mu: every token of a higher bin is in the head, no token of a lower bin is.
    Only the tokens of bin b are sorted; the head ends where the sort's cumulative mass, counted on
    from the bins above (in float64), first exceeds mu.
    """
    m, device = p.shape[0], p.device
    offsets = (torch.arange(m, dtype=torch.int32, device=device) * AKL_BINS).unsqueeze(1)
    flat = (p.float().view(torch.int32) >> 17).add_(offsets)                          # [m, V]: row r's bins from r * AKL_BINS
    zero = torch.zeros(m, 1, dtype=torch.float64, device=device)

    def from_top(weights):            # [m, AKL_BINS + 1]: the sum over bins j and above; column AKL_BINS is 0
        per_bin = torch.bincount(flat.flatten(), weights=weights.flatten(), minlength=m * AKL_BINS).view(m, AKL_BINS).double()
        return torch.cat([per_bin.flip(-1).cumsum(-1).flip(-1), zero], dim=1)
    mass, error = from_top(p), from_top(abs_err)
    boundary = ((mass[:, :AKL_BINS] > mu).sum(-1) - 1).clamp_min(0)                   # [m]
    mass_above = mass.gather(1, (boundary + 1).unsqueeze(1)).squeeze(1)                # the bins above: all in the head
    error_above = error.gather(1, (boundary + 1).unsqueeze(1)).squeeze(1)
    rows, cols = (flat == boundary.to(torch.int32).unsqueeze(1) + offsets).nonzero(as_tuple=True)     # row-major
    inside = _head_error_in_order(rows, p[rows, cols].double(), abs_err[rows, cols].double(), mass_above, mu, p.dtype)
    return error_above + inside, error[:, 0]


@torch.no_grad()
def akl_alpha(student_logits, teacher_logits, mu=0.5, tau=1.0, vocab_size=None):
    """Per-position AKL weight on FKL (docs/method.md 2): [..., V] x [..., V] -> [...], no gradient.

    alpha_t = g_head / (g_head + g_tail), g_head = sum over the teacher's head |p - q|,
    g_tail = the same over the rest; the head is every token (teacher probabilities in descending
    order) before the cumulative mass first exceeds mu, and always the top-1:
    p = [.4, .3, .2, .1], mu = .5 gives head {.4}.
    """
    _check_tau(tau, mu)
    student_logits, teacher_logits = _cut_vocab(student_logits, teacher_logits, vocab_size)
    vocab = student_logits.shape[-1]
    q = log_probs(student_logits, tau).exp().reshape(-1, vocab)
    p = log_probs(teacher_logits, tau).exp().reshape(-1, vocab)
    return _akl_alpha(p, (p - q).abs(), mu).reshape(student_logits.shape[:-1])


# ----------------------------------------------------------------------------------------------
# The chunked pass: one read of each logit row, closed-form gradients, nothing of size [N, V] kept


def _shift_(z, tau):
    """In place: z [n, V] (a private fp32 copy) becomes z / tau - max(z / tau), exactly 0 at each row's
    maxima and below 0 elsewhere. Returns the max [n, 1]."""
    if tau != 1.0:
        z.div_(tau)
    z_max = z.amax(dim=-1, keepdim=True)
    z.sub_(z_max)
    return z_max


def _softmax_parts_(z, z_max, probs):
    """In place, after _shift_: z becomes log softmax(z / tau), floored; probs [n, V] receives
    softmax(z / tau). Returns lse = logsumexp(z / tau) [n]; one exp per element (probs = exp(z - max)
    / sum, log_probs = z - max - log sum, no second exp)."""
    torch.exp(z, out=probs)
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    log_total = total.log_()
    z.sub_(log_total).clamp_min_(LOG_FLOOR)              # Choice L1
    return (z_max + log_total).squeeze(1)


def _load_chunk(work, student, teacher, idx):
    """Views (zs, zt, q, p) of the reused work buffers [4, chunk, V] for the rows idx, with the
    student's and teacher's logits of those rows (padded columns cut) copied into zs and zt."""
    zs, zt, q, p = (w[:len(idx)] for w in work)
    vocab = work.shape[-1]
    for src, out in ((student[:, :vocab], zs), (teacher[:, :vocab], zt)):
        if src.dtype == out.dtype:
            torch.index_select(src, 0, idx, out=out)
        else:
            out.copy_(src.index_select(0, idx))
    return zs, zt, q, p


def _non_target_lse(log_p, targets):
    """log sum_{v != g} exp(log_p(v)) = log(1 - p(g)) per row [n], summed over the non-target
    columns directly: subtracting p(g) from 1 loses every digit when p(g) -> 1 in fp32."""
    return torch.logsumexp(log_p.scatter(1, targets.unsqueeze(1), float("-inf")), dim=-1)


def _has_mass(nt_log):
    """Rows whose non-target probability is not 0 (below LOG_FLOOR / 2 every column is floored)."""
    return nt_log > LOG_FLOOR / 2


def _tckd_from_logs(log_p, log_q, targets, nt_p, nt_q):
    """TCKD = p(g) (log p(g) - log q(g)) + (1 - p(g)) (log(1 - p(g)) - log(1 - q(g))), per row."""
    lp_g, lq_g = log_p.gather(1, targets.unsqueeze(1)).squeeze(1), log_q.gather(1, targets.unsqueeze(1)).squeeze(1)
    return lp_g.exp() * (lp_g - lq_g) + torch.where(_has_mass(nt_p), nt_p.exp() * (nt_p - nt_q), 0.0)


def _nckd_from_logs(diff, log_q, targets, nt_p, nt_q):
    """NCKD = sum_{v != g} p_hat(v) (log p_hat(v) - log q_hat(v)), p_hat = p / (1 - p(g)), q_hat the
    same for q; diff = log p - log q. Since sum p_hat = 1 it is sum p_hat diff - nt_p + nt_q."""
    p_hat = torch.exp(diff + log_q - nt_p.unsqueeze(1)).scatter(1, targets.unsqueeze(1), 0.0)
    return torch.where(_has_mass(nt_p), (p_hat * diff).sum(-1) - nt_p + nt_q, 0.0)


def _atkd_grad(log_p, log_q, targets, nt_p, nt_q, g_tckd, g_nckd):
    """d(g_tckd TCKD + g_nckd NCKD) / dz_q, per row (derivation in _KDPassFunction's docstring)."""
    t = targets.unsqueeze(1)
    q_hat = torch.exp(log_q - nt_q.unsqueeze(1)).scatter_(1, t, 0.0)
    p_hat = torch.exp(log_p - nt_p.unsqueeze(1)).scatter_(1, t, 0.0)
    gap = (log_q.gather(1, t).exp() - log_p.gather(1, t).exp()).squeeze(1)           # q(g) - p(g)
    w_nckd = torch.where(_has_mass(nt_p), g_nckd, 0.0).unsqueeze(1)                  # NCKD = 0 there
    out = (q_hat - p_hat).mul_(w_nckd).sub_(q_hat.mul_((g_tckd * gap).unsqueeze(1)))
    return out.scatter_add_(1, t, (g_tckd * gap).unsqueeze(1))


# The peers' divergences: JSD(beta) as TRL defines it, TVD, DistiLLM's skew KL and skew reverse KL, and
# ABKD's alpha-beta divergence. Each is a D(p, q) per row with w = q dD/dq per column; through the
# softmax, dD/dz(u) = (w(u) - q(u) sum_v w(v)) / tau (the part of dD/dq constant in v cancels).
DIVERGENCES = ("jsd", "tvd", "skl", "srkl", "ab")


def _log_mix(log_a, log_b, weight_a):
    """log(w a + (1 - w) b) per element, from log a and log b."""
    if weight_a == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _divergence_and_slope(kind, c, log_p, log_q, p, q, slope=True):
    """(D [n], w = q dD/dq [n, V]) for teacher p and student q (floored logs, Choice L1):

        jsd   m = c p + (1 - c) q   D = c KL(p || m) + (1 - c) KL(q || m)   w = (1 - c) q log(q / m)
        tvd                         D = 1/2 sum |p - q|                      w = 1/2 q sign(q - p)
        skl   m = c p + (1 - c) q   D = KL(p || m)                           w = -(1 - c) q p / m
        srkl  m = c q + (1 - c) p   D = KL(q || m)                           w = q log(q / m) - c q^2 / m
        ab    c = (a, b)  D = -1/(a b) sum [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]    (ABKD, Wang et al. 2025)
                          w = q^b (q^a - p^a) / a, and (q^a - p^a) / a -> log(q / p) at a = 0
    ab at b = 0: 1/a^2 sum [a p^a log(p / q) - p^a + q^a] (FKL at (1, 0)); at a = 0 p, q and a, b swap (RKL at (0, 1)).
    """
    if kind == "ab":                # per column from r = log p - log q with expm1 (Choice 8.3: fp32 keeps its digits)
        (a, b), r = c, log_p - log_q
        if a == 0 or b == 0:        # k^-2 [x^k (k s + expm1(-k s))] = k^-2 [k s x^k + y^k - x^k]: x = p, s = r at b = 0
            k, s, log_x, log_y = (a, r, log_p, log_q) if b == 0 else (b, -r, log_q, log_p)
            x_k = torch.exp(k * log_x)
            value = torch.where(k * s > -1, x_k * (k * s + torch.expm1(-k * s)), k * s * x_k + torch.exp(k * log_y) - x_k)
            value = value.sum(-1) / k ** 2
        else:                       # r <= 0: q^(a+b) [a expm1((a+b) r) - (a+b) expm1(a r)] / (a b (a+b)); r > 0: its mirror
            low = r <= 0
            x, r_low = torch.where(low, r.new_tensor(a), r.new_tensor(b)), torch.where(low, r, -r)
            value = (torch.exp((a + b) * torch.maximum(log_p, log_q)) * (x * torch.expm1((a + b) * r_low) - (a + b) *
                     torch.expm1(x * r_low))).sum(-1) / (a * b * (a + b))
        w = torch.exp(b * log_q) * ((torch.expm1(a * log_q) - torch.expm1(a * log_p)) / a if a else -r) if slope else None
        return value, w
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p) if slope else None
    if kind == "srkl":
        log_m = _log_mix(log_q, log_p, c)
        return (q * (log_q - log_m)).sum(-1), q * ((log_q - log_m) - c * torch.exp(log_q - log_m)) if slope else None
    log_m = _log_mix(log_p, log_q, c)
    if kind == "jsd":
        value = c * (p * (log_p - log_m)).sum(-1) + (1 - c) * (q * (log_q - log_m)).sum(-1)
        return value, (1 - c) * q * (log_q - log_m) if slope else None
    return (p * (log_p - log_m)).sum(-1), -(1 - c) * q * torch.exp(log_p - log_m) if slope else None


def _default_chunk_tokens(vocab, device):
    # CPU: ~1M elements (4 MB fp32 per buffer) stay in cache; GPU: big chunks amortise launches.
    elements = 2 ** 25 if device.type == "cuda" else 2 ** 20
    return max(1, elements // vocab)


class _KDPassFunction(torch.autograd.Function):
    """Per-token FKL, RKL and CE of the masked rows, with closed-form gradients.

    With q = softmax(z / tau) and d log q(v) / d z(u) = (1[u = v] - q(u)) / tau:

        dFKL/dz(u) = -sum_v p(v) (1[u = v] - q(u)) / tau              = (q(u) - p(u)) / tau
        dRKL/dz(u) = sum_v dq(v)/dz(u) (log q(v) - log p(v)) + sum_v q(v) dlog q(v)/dz(u)
                   = q(u) (log q(u) - log p(u) - RKL) / tau + 0
        dCE/dz(u)  = softmax(z)(u) - 1[u = y]                          (tau = 1, Choice L3)

    ATKD's terms (tau = 1, reference token g, q_hat = q renormalised over v != g, p_hat the same):
    TCKD = KL([p(g), 1 - p(g)] || [q(g), 1 - q(g)]) depends on z only through q(g), and
    dq(g)/dz(u) = q(g) (1[u = g] - q(u)), so

        dTCKD/dz(g) = q(g) - p(g)          dTCKD/dz(u != g) = -q_hat(u) (q(g) - p(g))

    NCKD = KL(p_hat || q_hat) is a forward KL over the non-target columns, and q_hat is a softmax
    of z over them, so dNCKD/dz(u != g) = q_hat(u) - p_hat(u) and dNCKD/dz(g) = 0. (Check: with
    FKL = TCKD + (1 - p(g)) NCKD the two give q(u) - p(u), the FKL gradient.)

    FKL and RKL carry the factor tau^2, so their gradients carry tau. Forward keeps only the
    per-row log-normalisers [N]; backward recomputes p and q chunk by chunk from the saved logits
    and writes each chunk's gradient into one buffer (or, with inplace_grad, into the student
    logits themselves). Four [chunk, V] work buffers are allocated once and reused by every chunk:
    no activation of size [tokens, V] is kept, and no chunk pays for fresh memory.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, targets, tau, vocab, mu, chunk, inplace_grad, atkd, akl_on, divergence):
        # student [R, V_s], teacher [R, V_t] (padded columns beyond `vocab` are ignored),
        # rows [N] indices of the masked rows, targets [N] reference token ids or empty.
        cdtype, device, n = _compute_dtype(student.dtype), student.device, len(rows)
        fkl, rkl, akl, lse_s, lse_t = (torch.zeros(n, dtype=cdtype, device=device) for _ in range(5))
        # ATKD (only when asked): TCKD, NCKD and log(1 - p(g)), log(1 - q(g)) per token
        tckd, nckd, nt_p, nt_q = (torch.zeros(n if atkd else 0, dtype=cdtype, device=device) for _ in range(4))
        ce = torch.zeros(len(targets), dtype=cdtype, device=device)
        lse_ce = torch.zeros(len(targets) if tau != 1.0 else 0, dtype=cdtype, device=device)
        div = torch.zeros(n if divergence else 0, dtype=cdtype, device=device)    # a peer's divergence, asked for
        stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)
        stats[0] = n
        work = torch.empty(4, min(chunk, n), vocab, dtype=cdtype, device=device)
        for lo in range(0, n, chunk):
            idx, sl = rows[lo:lo + chunk], slice(lo, lo + chunk)
            zs, zt, q, p = _load_chunk(work, student, teacher, idx)
            if len(targets):                                           # CE at tau = 1 (Choice L3)
                target_logit = zs.gather(1, targets[sl].unsqueeze(1)).squeeze(1)
                if tau != 1.0:
                    lse_ce[sl] = torch.logsumexp(zs, dim=-1)
            s_max, t_max = _shift_(zs, tau), _shift_(zt, tau)
            # Top-1 agreement: some token is a maximum of both. Shifted rows are 0 exactly there, and the
            # sum of two floats <= 0 is 0 only where both are: one add and one max, no argmax.
            agree = torch.add(zs, zt, out=q).amax(-1) == 0
            lse_s[sl], lse_t[sl] = _softmax_parts_(zs, s_max, q), _softmax_parts_(zt, t_max, p)
            log_q, log_p = zs, zt
            if len(targets):                                           # floored like log q
                ce[sl] = ((lse_s if tau == 1.0 else lse_ce)[sl] - target_logit).clamp_max(-LOG_FLOOR)
            if atkd:
                nt_p[sl], nt_q[sl] = _non_target_lse(log_p, targets[sl]), _non_target_lse(log_q, targets[sl])
                tckd[sl] = _tckd_from_logs(log_p, log_q, targets[sl], nt_p[sl], nt_q[sl])
            if divergence:
                div[sl] = _divergence_and_slope(*divergence, log_p, log_q, p, q, slope=False)[0] * tau ** 2
            diff = log_p.sub_(log_q)                                   # log p - log q, reuses log_p
            if atkd:                                                   # p_hat = exp(diff + log q - nt_p)
                nckd[sl] = _nckd_from_logs(diff, log_q, targets[sl], nt_p[sl], nt_q[sl])
            # All four row dot products in one BLAS call: (q, p) x (log q, diff) -> [n, 2, 2].
            dots = torch.bmm(work[2:4, :len(idx)].transpose(0, 1), work[0:2, :len(idx)].permute(1, 2, 0))
            q_log_q, q_diff, p_log_q, p_diff = dots.flatten(1).unbind(1)
            fkl[sl], rkl[sl] = p_diff * tau ** 2, -q_diff * tau ** 2
            h_p, h_q = -(p_diff + p_log_q), -q_log_q                  # log p = diff + log q
            if akl_on:                                                 # the head search: only when asked
                akl[sl] = _akl_alpha(p, torch.sub(p, q, out=diff).abs_(), mu)
            stats[1:7] += torch.stack([fkl[sl].sum(), rkl[sl].sum(), h_p.sum(), h_q.sum(),
                                       akl[sl].sum(), agree.sum()]).double()
        stats[7] = ce.sum().double()
        unc = nt_p.exp()                                               # 1 - p(g), without a subtraction
        ctx.save_for_backward(student, teacher, rows, targets, rkl, lse_s, lse_t, lse_ce, nt_p, nt_q)
        ctx.settings = (tau, vocab, chunk, inplace_grad, atkd, divergence)
        if not akl_on:
            stats[5] = float("nan")                                    # not computed: never a silent 0
        ctx.mark_non_differentiable(akl, stats, unc)
        return fkl, rkl, ce, akl, stats, tckd, nckd, unc, div

    @staticmethod
    def backward(ctx, g_fkl, g_rkl, g_ce, _g_akl, _g_stats, g_tckd, g_nckd, _g_unc, g_div):
        student, teacher, rows, targets, rkl, lse_s, lse_t, lse_ce, nt_p, nt_q = ctx.saved_tensors
        tau, vocab, chunk, inplace_grad, atkd, divergence = ctx.settings
        cdtype, n = _compute_dtype(student.dtype), len(rows)
        grad = student if inplace_grad else torch.empty_like(student)
        unused = torch.ones(len(student), dtype=torch.bool, device=student.device)
        unused[rows] = False              # rows outside the mask and padded columns: no gradient (filled
        grad.index_fill_(0, unused.nonzero().squeeze(1), 0)     # by index: a boolean fill reads all rows)
        grad[:, vocab:] = 0
        g_view, rkl_unscaled = grad[:, :vocab], rkl / tau ** 2
        work = torch.empty(4, min(chunk, n), vocab, dtype=cdtype, device=student.device)
        for lo in range(0, n, chunk):
            idx, sl = rows[lo:lo + chunk], slice(lo, lo + chunk)
            zs, zt, q, p = _load_chunk(work, student, teacher, idx)
            if len(targets) and tau != 1.0:
                p_ce = torch.exp(zs - lse_ce[sl].unsqueeze(1))       # softmax(z) at tau = 1
            for z, lse in ((zs, lse_s), (zt, lse_t)):                 # log softmax = z / tau - lse
                if tau != 1.0:
                    z.div_(tau)
                z.sub_(lse[sl].unsqueeze(1)).clamp_min_(LOG_FLOOR)
            log_q, log_p = zs, zt
            extra = _atkd_grad(log_p, log_q, targets[sl], nt_p[sl], nt_q[sl], g_tckd[sl], g_nckd[sl]) if atkd else None
            q, p = torch.exp(log_q, out=q), torch.exp(log_p, out=p)
            if divergence:                                           # g_div (w - q sum w), before log_q goes
                w = _divergence_and_slope(*divergence, log_p, log_q, p, q)[1]
                extra = (w - q * w.sum(-1, keepdim=True)) * (g_div[sl] * tau).unsqueeze(1) + (extra if extra is not None else 0)
            # dRKL: q * (log q - log p - RKL), weighted per row by g_rkl; built in log_q's buffer.
            g = log_q.sub_(log_p).sub_(rkl_unscaled[sl].unsqueeze(1)).mul_(q)
            g.mul_(g_rkl[sl].unsqueeze(1))
            g.add_(p.sub_(q).mul_(g_fkl[sl].unsqueeze(1)), alpha=-1.0)   # + g_fkl * (q - p)
            if tau != 1.0:
                g.mul_(tau)                                          # tau^2 / tau
            if len(targets):                                         # + g_ce * (softmax - onehot)
                g_ce_rows = g_ce[sl].unsqueeze(1)
                g.add_((q if tau == 1.0 else p_ce).mul_(g_ce_rows))
                g.scatter_add_(1, targets[sl].unsqueeze(1), -g_ce_rows)
            if extra is not None:
                g.add_(extra)
            g_view.index_copy_(0, idx, g.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None, None, None, None


@dataclass
class KDPassResult:
    """kd_pass's output per masked token [N]: fkl, rkl (times tau^2), ce (tau = 1), akl_alpha, ATKD's tckd,
    nckd, unc = 1 - p(g), div (None where not asked for); stats: float64 [len(STAT_NAMES)], the token
    count and every statistic's sum: add over micro-batches, all-reduce over ranks, then stat_means."""
    fkl: torch.Tensor
    rkl: torch.Tensor
    ce: torch.Tensor | None
    akl_alpha: torch.Tensor | None
    stats: torch.Tensor
    tckd: torch.Tensor | None = None
    nckd: torch.Tensor | None = None
    unc: torch.Tensor | None = None
    div: torch.Tensor | None = None


def kd_pass(student_logits, teacher_logits, mask, tau=1.0, vocab_size=None, chunk_tokens=None,
            target_ids=None, mu=0.5, inplace_grad=False, atkd=False, akl=True, divergence=None):
    """The training pass: FKL, RKL (and CE) of every masked token plus the policy's statistics.

    student_logits [..., V_s] (requires grad), teacher_logits [..., V_t], mask [...] (bool: this position's
    next token is a response token), target_ids [...] (optional: the reference next tokens; without them
    the CE statistic is NaN). vocab_size cuts padded columns (GPT-2: 50304 -> 50257) before any softmax.
    Rows go chunk_tokens at a time (default: about 1M elements on CPU, 32M on CUDA), in >= fp32.

    akl=False skips the AKL head search (akl_alpha None, its statistic NaN). atkd=True also returns ATKD's
    TCKD, NCKD and 1 - p(g) (target_ids, tau = 1). divergence=(kind, c) also returns a peer's divergence
    with its closed-form gradient: ("jsd", beta) TRL's generalized JSD, ("tvd", 0), ("skl", a), ("srkl", a)
    DistiLLM's skew KLs, ("ab", (a, b)) ABKD. inplace_grad=True writes the gradient into student_logits'
    storage, saving a [tokens, V] buffer, when nothing reads the logits after backward.

    Typical loss for an optimizer step with global response-token count n_global:
        out = kd_pass(...); loss = mix(out.fkl, out.rkl, alpha).sum() / n_global
    """
    _check_tau(tau, mu)
    _cut_vocab(student_logits, teacher_logits, vocab_size)   # shape checks; the cut happens per chunk
    vocab = vocab_size or student_logits.shape[-1]
    if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}")
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    rows = mask.reshape(-1).nonzero().squeeze(1)
    targets = torch.empty(0, dtype=torch.long, device=student.device)
    if target_ids is None and vocab < teacher.shape[1] and len(teacher):    # a cheap check on a few rows:
        few = teacher[:16].float()                                            # padding holds little mass
        dropped = float((few[:, vocab:].logsumexp(-1) - few.logsumexp(-1)).exp().mean())
        if dropped > 0.5:
            raise ValueError(f"vocab_size={vocab} drops columns that hold {dropped:.0%} of the teacher's probability: "
                             "it must cut padding only; pass the tokenizer's length, len(tokenizer)")
    if target_ids is not None:
        if tuple(target_ids.shape) != tuple(mask.shape):
            raise ValueError(f"target_ids {tuple(target_ids.shape)} does not match mask {tuple(mask.shape)}")
        targets = target_ids.reshape(-1)[rows]
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < vocab:
            raise ValueError(f"target_ids on masked positions must lie in [0, {vocab}), "
                             f"got [{int(targets.min())}, {int(targets.max())}]")
    # Overwriting the logits is only safe when they are a separate tensor from the teacher's.
    inplace_grad = inplace_grad and student.is_contiguous() and \
        student.untyped_storage().data_ptr() != teacher.untyped_storage().data_ptr()
    chunk = chunk_tokens or _default_chunk_tokens(vocab, student.device)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if atkd and (target_ids is None or tau != 1.0):
        raise ValueError("atkd=True needs target_ids and tau = 1 (ATKD is defined at temperature 1)")
    if divergence is not None:              # c: a number, ab's a pair (a, b)
        c = divergence[1]
        divergence = (divergence[0], tuple(map(float, c)) if isinstance(c, (tuple, list)) else float(c))
        _check_divergence(*divergence)
    fkl, rkl, ce, akl_alpha, stats, tckd, nckd, unc, div = _KDPassFunction.apply(
        student, teacher, rows, targets, float(tau), vocab, float(mu), int(chunk), inplace_grad, bool(atkd), bool(akl),
        divergence)
    if target_ids is None:
        stats[7] = float("nan")                                  # not computed: never a silent 0
    return KDPassResult(fkl, rkl, ce if target_ids is not None else None, akl_alpha if akl else None, stats,
                        *((tckd, nckd, unc) if atkd else (None, None, None)), div if divergence else None)


# ----------------------------------------------------------------------------------------------
# A cached teacher (docs/method.md 8.6, 8.7): its top-k, the reference token and the rest as one bucket


def teacher_summary(teacher_logits, target_ids, k, vocab_size=None):
    """What a cache keeps of the teacher per position (tau = 1, real vocabulary): (log-probs [..., k] and ids
    [..., k] of its top k, log p(g) of the reference token g, log of the mass outside the top k and g)."""
    log_p = teacher_logits[..., :vocab_size].to(_compute_dtype(teacher_logits.dtype)).log_softmax(-1)
    if not 0 < k <= log_p.shape[-1] or target_ids.shape != log_p.shape[:-1]:
        raise ValueError(f"teacher_summary: k = {k} must lie in 1..{log_p.shape[-1]}, target_ids {tuple(target_ids.shape)} "
                         f"match the logits {tuple(log_p.shape)} but the last axis")
    top_logp, top_ids = log_p.topk(k, dim=-1)
    kept = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, top_ids, True).scatter_(-1, target_ids[..., None], True)
    return top_logp, top_ids, log_p.gather(-1, target_ids[..., None])[..., 0], log_p.masked_fill(kept, -math.inf).logsumexp(-1)


def cached_teacher_logits(student_logits, top_logp, top_ids, target_ids, target_logp, tail_logp, vocab_size=None):
    """Teacher log-probs [..., V] rebuilt from teacher_summary: exact at the top-k ids and at g, and the
    tail's mass p_tail spread over the other columns as the student spreads its own:

        log p_v = log p_tail + log q_v - log q_tail        (q_tail: the student's mass on those columns)

    p_v / q_v is then one constant over the tail, so every divergence sum_v q_v f(p_v / q_v) (FKL, RKL,
    JSD, TVD, the skews) and its gradient with the teacher held fixed equal the same divergence over the
    buckets (the exact columns, the tail as one): the student's tail moves only as a whole. Both KLs are
    lower bounds of the true ones (docs/method.md 8.7). student_logits detached; g may be in the top k."""
    log_q = student_logits[..., :vocab_size].detach().to(_compute_dtype(student_logits.dtype)).log_softmax(-1)
    if not (top_logp.shape == top_ids.shape and top_ids.shape[:-1] == log_q.shape[:-1] == target_ids.shape
            == target_logp.shape == tail_logp.shape) or len(top_ids) and int(top_ids.max()) >= log_q.shape[-1]:
        raise ValueError(f"cached_teacher_logits: student logits {tuple(log_q.shape)} (vocabulary cut), top-k "
                         f"{tuple(top_ids.shape)}, targets {tuple(target_ids.shape)}: shapes or ids do not match")
    kept = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, top_ids, True).scatter_(-1, target_ids[..., None], True)
    log_q_tail = log_q.masked_fill(kept, -math.inf).logsumexp(-1, keepdim=True).clamp_min(LOG_FLOOR)
    rebuilt = tail_logp[..., None] + log_q - log_q_tail
    return rebuilt.scatter(-1, target_ids[..., None], target_logp[..., None]).scatter(-1, top_ids, top_logp)


def response_targets(input_ids, prompt_lengths, attention_mask=None):
    """(targets, mask) for kd_pass from right-padded input_ids [B, T], each row's prompt length and the
    attention mask: targets[:, t] is the token at t + 1 where that token is a response token (past its
    prompt, not padding), else IGNORE_INDEX; mask = targets != IGNORE_INDEX. Shifted and masked here,
    so that no loop of one's own forgets either (an unshifted or unmasked target trains on the prompt)."""
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)
    if len(lengths) != len(input_ids) or not bool(((lengths >= 1) & (lengths <= input_ids.shape[1])).all()):
        raise ValueError(f"prompt_lengths: one per row of input_ids {tuple(input_ids.shape)}, each in 1..{input_ids.shape[1]}")
    response = torch.arange(input_ids.shape[1], device=input_ids.device) >= lengths
    if attention_mask is not None:
        response &= attention_mask.bool()
    targets = next_token_targets(torch.where(response, input_ids, IGNORE_INDEX))
    return targets, targets != IGNORE_INDEX


def next_token_targets(labels, ignore_index=IGNORE_INDEX):
    """Hugging Face labels [B, T] aligned with the logits that predict them: targets[:, t] = labels[:, t + 1],
    the last position ignore_index (the full length, not logits[:, :-1], lets inplace_grad reuse the logits)."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


def stat_means(stats):
    """float64 [len(STAT_NAMES)] sums -> {name: mean over tokens} plus "tokens"; 0 tokens -> 0."""
    tokens = float(stats[0])
    means = {name: float(stats[i]) / tokens if tokens > 0 else 0.0
             for i, name in enumerate(STAT_NAMES) if i > 0}
    means["tokens"] = tokens
    return means


def mix(fkl, rkl, alpha):
    """alpha * FKL + (1 - alpha) * RKL; alpha a float or a per-token tensor (AKL)."""
    return alpha * fkl + (1 - alpha) * rkl


# ----------------------------------------------------------------------------------------------
# Weighting strategies: a name, its numbers, and a rule for the step's alpha (docs/method.md 2)


def greedy_alpha(stats):
    """FKL / (FKL + RKL) from summed kd_pass stats: weight the direction that is worse now; 0/0 -> 0.5."""
    fkl, rkl = float(stats[1]), float(stats[2])
    return fkl / (fkl + rkl) if fkl + rkl > 0 else 0.5


# alpha for a whole step from (the strategy's numbers, progress in [0, 1], the step's summed stats).
# `akl` has no step rule (kd_pass gives one alpha per token, akl_alpha), `arkd` asks its policy, and
# `atkd` weighs TCKD and NCKD per token (atkd_loss) instead of FKL and RKL. A trainer may add rules of
# its own to STEP_RULES and STRATEGY_ARITY (the laboratory's `replay` does: experiments/replay.py).
# The peers' divergences (jsd:B, tvd, skl:A, srkl:A, ab:A,B) replace the mixture: kd_pass(divergence=...).
STEP_RULES = {
    "fkl": lambda numbers, progress, stats: 1.0,
    "rkl": lambda numbers, progress, stats: 0.0,
    "fixed": lambda numbers, progress, stats: numbers[0],
    "linear": lambda numbers, progress, stats: numbers[0] + (numbers[1] - numbers[0]) * progress,
    "greedy": lambda numbers, progress, stats: greedy_alpha(stats),
}
STRATEGY_ARITY = {"fkl": 0, "rkl": 0, "fixed": 1, "linear": 2, "greedy": 0, "akl": 0, "arkd": 0, "atkd": 0,
                  "jsd": 1, "tvd": 0, "skl": 1, "srkl": 1, "ab": 2}


def parse_strategy(text):
    """'linear:0.9,0.1' -> ('linear', (0.9, 0.1)); a ValueError naming the valid ones for a bad name or number."""
    kind, _, arguments = str(text).strip().partition(":")
    numbers = tuple(arguments.split(",")) if arguments else ()
    if kind not in STRATEGY_ARITY or len(numbers) != STRATEGY_ARITY[kind]:
        raise ValueError(f"unknown strategy {text!r}; valid: {STRATEGY_NAMES} "
                         "(A, A0, A1 numbers in [0, 1]; ab's a, b >= 0)")
    values = []
    for number in numbers:
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"strategy {text!r}: {number!r} is not a number") from None
        if not 0.0 <= value <= 1.0 and kind != "ab":      # ab: any a, b >= 0 (_check_divergence)
            raise ValueError(f"strategy {text!r}: alpha {value} lies outside [0, 1]")
        values.append(value)
    if kind in DIVERGENCES:
        _check_divergence(kind, tuple(values) if kind == "ab" else values[0] if values else 0.0)
    return kind, tuple(values)


def strategy_alpha(strategy, step, total_steps, stats=None):
    """alpha of step `step` (0-based) of `total_steps` by a step rule: linear goes from A0 at step 0 to A1 at
    the last; greedy needs the step's summed stats."""
    kind, numbers = strategy
    if kind not in STEP_RULES:
        raise ValueError(f"strategy {kind!r} has no step rule: akl and atkd weigh each token, arkd asks its policy")
    if kind == "greedy" and stats is None:
        raise ValueError("strategy 'greedy' needs the step's stats")
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return STEP_RULES[kind](numbers, progress, stats)
