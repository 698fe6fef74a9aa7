"""LoRA on a teacher's attention query and value projections, for OKD (docs/method.md 8): the teacher's
weights stay frozen, a low-rank module on its W_q and W_v trains with the student (torch only):

    params = add_lora(teacher, rank=32, scale=1.0)     # W_up starts at zero: the teacher is unchanged
    teacher_optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    h_q <- h_q + scale * x W_down W_up        (the same for h_v; W_down [d_in, r], W_up [r, d_out])

Layouts: GPT-2's fused `c_attn` (a Conv1D giving [q | k | v]: only q and v get a LoRA) and LLaMA's
`q_proj` / `v_proj`. Choices (docs/method.md 8): O1 W_down Kaiming uniform, W_up zero, so step 0 is
the frozen teacher exactly; O2 the scale s = 1 (the paper: "s >= 1, tunable").
"""
import math

import torch
from torch import nn


class LoRA(nn.Module):
    """The low-rank update scale * x W_down W_up: [..., d_in] -> [..., d_out]."""

    def __init__(self, d_in, d_out, rank, scale):
        super().__init__()
        self.down = nn.Parameter(torch.empty(d_in, rank))
        self.up = nn.Parameter(torch.zeros(rank, d_out))          # Choice O1: starts as the identity update
        nn.init.kaiming_uniform_(self.down.T, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x):
        return self.scale * (x.to(self.down.dtype) @ self.down @ self.up)


class FusedQKVWithLoRA(nn.Module):
    """GPT-2's c_attn (output [q | k | v], each of width d) plus a LoRA on the q and v thirds."""

    def __init__(self, base, rank, scale):
        super().__init__()
        d_in, d_out = base.weight.shape                            # Conv1D stores [d_in, 3 d]
        self.base, self.width = base, d_out // 3
        self.q, self.v = LoRA(d_in, self.width, rank, scale), LoRA(d_in, self.width, rank, scale)

    def forward(self, x):
        out = self.base(x)
        zeros = torch.zeros_like(out[..., :self.width])
        return out + torch.cat([self.q(x).to(out.dtype), zeros, self.v(x).to(out.dtype)], dim=-1)


class LinearWithLoRA(nn.Module):
    """A LLaMA-style q_proj or v_proj (nn.Linear) plus its LoRA."""

    def __init__(self, base, rank, scale):
        super().__init__()
        self.base, self.lora = base, LoRA(base.in_features, base.out_features, rank, scale)

    def forward(self, x):
        out = self.base(x)
        return out + self.lora(x).to(out.dtype)


def add_lora(model, rank=32, scale=1.0):
    """Wraps every attention q / v projection of `model` in place, freezes everything else and returns the
    LoRA parameters; an unknown layout is a ValueError naming the model class and its modules."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in ("c_attn", "q_proj", "v_proj")]
    if not targets:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise ValueError(f"OKD: no attention projection of {type(model).__name__} is recognised (looked for "
                         f"GPT-2's c_attn or LLaMA's q_proj / v_proj; module names found: {', '.join(names[:40])})")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = FusedQKVWithLoRA(module, rank, scale) if child == "c_attn" else LinearWithLoRA(module, rank, scale)
        setattr(parent, child, wrapped.to(module.weight.device))
    return lora_parameters(model)


def lora_parameters(model):
    """The LoRA parameters of a model wrapped by add_lora, in a fixed order."""
    return [p for name, p in model.named_parameters() if name.endswith((".down", ".up"))]


def lora_state_dict(model):
    """{name: tensor} of the LoRA weights only (what a checkpoint adds to the frozen teacher)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith((".down", ".up"))}
