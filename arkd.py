"""ARKD training: SFT, SeqKD and KD with every alpha strategy (ARKD included), on one GPU or many.

The method, its equations and every choice made where the paper is vague are in docs/method.md;
this file is its training loop, on top of losses.py, policy.py, data.py and evaluate.py. Every
strategy is trained by the same loop, so the comparison is fair. Read train_step for one ARKD step:

    token count -> micro-batch 0's statistics -> alpha (a strategy rule or policy.act)
    -> alpha FKL + (1 - alpha) RKL -> backward over the micro-batches -> clip, optimizer step
    -> reward: micro-batch 0 again after the step -> store the reward -> REINFORCE every M rewards

    python arkd.py --method kd --strategy arkd --teacher T --student S --data_dir D --out RUN
    torchrun --nproc_per_node=8 arkd.py ...          # DDP: nccl on CUDA, gloo on CPU
    python arkd.py --method kd --strategy arkd ... --out RUN --resume
    python arkd.py plot RUN                           # figures 5 and 6 of the paper as PNG

Choices T1-T7 of docs/method.md are made here (each marked where it is made): the step's token
count as the one denominator (T1), alpha from micro-batch 0 (T2), the reward forward replaying the
training dropout masks (T3), skipped non-finite steps (T4), SeqKD by sampling (T5), warmup then
cosine (T6), and what a checkpoint holds (T7); for OKD, the LoRA's a_t and optimizer (O3, O4).
ATKD (`--strategy atkd`) and OKD (`--method okd`) run in the same step (docs/method.md 8).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import evaluate
from data import barrier, print0, write_atomic
from lora import add_lora, lora_parameters, lora_state_dict
from losses import (IGNORE_INDEX, STAT_NAMES, atkd_easy, atkd_loss, kd_pass, mix, next_token_targets, parse_strategy,
                    stat_means, strategy_alpha)
from policy import ARKDPolicy, all_reduce_sum, immediate_reward, make_state

# Flags that define a run: a checkpoint resumes only under the same values (and world size).
RUN_DEFINING = ("method", "strategy", "teacher", "student", "data_dir", "tau", "lm_weight", "lr",
                "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "seed", "reward_every",
                "policy_buffer", "policy_lr", "policy_entropy", "seqkd_data", "train_examples", "atkd_lam",
                "okd_rank", "okd_scale", "okd_lr", "okd_a_t")


# ----------------------------------------------------------------------------------------------
# Settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ARKD / KD / SFT training (see the module docstring).")
    # what to train
    p.add_argument("--method", default="kd", choices=("sft", "seqkd", "kd", "okd"), help="sft: CE on references; "
                   "seqkd: CE on teacher samples; kd: alpha FKL + (1 - alpha) RKL; okd: FKL against a teacher "
                   "whose LoRA trains alongside")
    p.add_argument("--strategy", default="arkd", help="kd only: fkl, rkl, fixed:A, linear:A0,A1, greedy, akl, arkd, atkd")
    p.add_argument("--teacher", default="MiniLLM/teacher-gpt2-1.5B", help="teacher model (kd, seqkd)")
    p.add_argument("--student", default="MiniLLM/init-gpt2-120M", help="student initialisation")
    p.add_argument("--data_dir", default=None, help="MiniLLM Hub layout on disk; default: the Hub")
    p.add_argument("--seqkd_data", default=None, help="seqkd: where teacher samples go (default OUT/seqkd_data)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, plots")
    # objective
    p.add_argument("--tau", type=float, default=1.0, help="temperature; the KD loss is scaled by tau^2")
    p.add_argument("--lm_weight", type=float, default=0.0, help="weight of the reference CE added to KD")
    p.add_argument("--chunk_tokens", type=int, default=None, help="kd_pass chunk (default: by device)")
    p.add_argument("--atkd_lam", type=float, default=0.2, help="atkd: weight of the easy tokens' NCKD (lambda)")
    # OKD: the teacher's LoRA
    p.add_argument("--okd_rank", type=int, default=32, help="okd: LoRA rank on the teacher's W_q and W_v")
    p.add_argument("--okd_scale", type=float, default=1.0, help="okd: LoRA scale s (Choice O2)")
    p.add_argument("--okd_lr", type=float, default=None, help="okd: LoRA learning rate (default: --lr)")
    p.add_argument("--okd_a_t", type=float, default=0.5, help="okd: the LoRA's loss a_t KL(q || p) + (1 - a_t) CE (Choice O3)")
    # optimisation
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (5e-4 for 120M, 1e-4 larger: docs/method.md 7)")
    p.add_argument("--warmup_ratio", type=float, default=0.05, help="share of steps with linear warmup")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps (0: from --epochs)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per device per micro-batch")
    p.add_argument("--grad_accum", type=int, default=0, help="micro-batches per step (0: global batch 32)")
    p.add_argument("--bf16", default="auto", choices=("auto", "yes", "no"), help="bf16 autocast (auto: on CUDA)")
    p.add_argument("--seed", type=int, default=1, help="seed of data order, dropout and the policy")
    # ARKD policy
    p.add_argument("--reward_every", type=int, default=1, help="steps one action spans (reward at the end)")
    p.add_argument("--policy_buffer", type=int, default=8, help="actions per REINFORCE update (M)")
    p.add_argument("--policy_lr", type=float, default=3e-3, help="policy Adam learning rate")
    p.add_argument("--policy_entropy", type=float, default=0.1, help="entropy bonus c_H")
    # validation, checkpoints, logging
    p.add_argument("--eval_every", type=int, default=200, help="validate and checkpoint every N steps (0: at the end)")
    p.add_argument("--val_examples", type=int, default=500, help="dev prompts used for validation Rouge-L")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens sampled per prompt (validation, SeqKD)")
    p.add_argument("--gen_batch_size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--train_examples", type=int, default=0, help="use the first N training records (0: all)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--resume_previous", action="store_true", help="continue from OUT/last.old, the checkpoint "
                   "before the last one (when OUT/last does not load)")
    p.add_argument("--stop_after", type=int, default=0, help="leave after N steps of this run, "
                   "checkpointed, e.g. for a job time limit (0: run to the end)")
    p.add_argument("--max_bad_steps", type=int, default=10, help="stop after N non-finite steps in a row")
    args = p.parse_args(argv)
    if args.method == "kd":
        parse_strategy(args.strategy)                  # unknown names fail here, before any work
    for name in ("lr", "batch_size", "epochs", "reward_every", "policy_buffer", "val_examples", "max_bad_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0")
    if args.tau <= 0 or args.lm_weight < 0 or not 0 <= args.warmup_ratio < 1:
        p.error("--tau must be > 0, --lm_weight >= 0, --warmup_ratio in [0, 1)")
    if not (0 <= args.atkd_lam <= 1 and 0 <= args.okd_a_t <= 1) or args.okd_rank < 1:
        p.error("--atkd_lam and --okd_a_t must lie in [0, 1], --okd_rank must be >= 1")
    if args.method == "kd" and args.strategy == "atkd" and args.tau != 1:
        p.error("--strategy atkd is defined at temperature 1: drop --tau")
    return args


@dataclass
class Run:
    """What a run knows besides its flags: processes, device, numerics, vocabulary, schedule."""
    rank: int
    world_size: int
    device: torch.device
    bf16: bool
    grad_accum: int
    strategy: tuple = None          # parsed --strategy (kd only)
    vocab_size: int = 0
    pad_id: int = 0
    total_steps: int = 0
    warmup_steps: int = 0

    @property
    def master(self):               # rank 0 logs, checkpoints and plots
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def start(args):
    """Joins the other processes (torchrun) and fixes the run's device, precision and accumulation."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()       # one bar per run is enough: ours
    models = [args.student] + ([args.teacher] if args.method != "sft" else [])
    for path in models:                            # missing paths fail in seconds, before any load
        evaluate.check_model_path(path)
    if args.data_dir is not None:
        data.dataset_file("dolly_train", args.data_dir)
    rank, world_size, device = data.init_processes()
    grad_accum = args.grad_accum
    if grad_accum == 0:
        if 32 % (args.batch_size * world_size):
            raise ValueError(f"global batch 32 is not a multiple of --batch_size {args.batch_size} x "
                             f"{world_size} processes: set --grad_accum")
        grad_accum = 32 // (args.batch_size * world_size)
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda")
    # OKD's student learns by FKL alone (method.md 8); SFT and SeqKD have no strategy.
    strategy = parse_strategy(args.strategy) if args.method == "kd" else ("fkl", ()) if args.method == "okd" else None
    return Run(rank, world_size, device, bf16, grad_accum, strategy)


# ----------------------------------------------------------------------------------------------
# Models and data


def load_models(args, run, checkpoint=None):
    """(tokenizer, student, teacher or None); refuses a teacher whose tokenizer differs (method.md 1)."""
    tokenizer = evaluate.load_tokenizer(args.student)
    run.vocab_size, run.pad_id = len(tokenizer), tokenizer.pad_token_id
    teacher = None
    if args.method != "sft":
        teacher_tokenizer = evaluate.load_tokenizer(args.teacher)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {args.teacher} ({len(teacher_tokenizer)} tokens) and student {args.student} "
                             f"({len(tokenizer)} tokens) use different tokenizers: distillation needs one")
        dtype = torch.bfloat16 if run.bf16 else torch.float32
        teacher = evaluate.load_model(args.teacher, run.device, dtype, run.vocab_size).eval().requires_grad_(False)
        if args.method == "okd":                   # the teacher's LoRA trains with the student (method.md 8)
            add_lora(teacher, args.okd_rank, args.okd_scale)
    student = evaluate.load_model(checkpoint or args.student, run.device, torch.float32, run.vocab_size).train()
    return tokenizer, student, teacher


def load_training_data(args, run, tokenizer, train_dir):
    """(training examples, dev examples, dev records); fixes run.total_steps and run.warmup_steps."""
    records = data.load_records("dolly_train", train_dir)[:args.train_examples or None]
    examples, _ = data.encode_records(tokenizer, records, "dolly_train")
    val_records = data.load_records("dolly_dev", args.data_dir)[:args.val_examples]
    val_examples, _ = data.encode_records(tokenizer, val_records, "dolly_dev")
    steps_per_epoch = len(examples) // (args.batch_size * run.grad_accum * run.world_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} training examples are fewer than one global batch")
    run.total_steps = args.max_steps or args.epochs * steps_per_epoch
    run.warmup_steps = int(args.warmup_ratio * run.total_steps)
    return examples, val_examples, val_records


def micro_batches(examples, step, args, run):
    """The micro-batches of optimizer step `step` on this rank (a pure function of the step).

    Every epoch has its own seeded order; rank r takes every world_size-th example of it, so
    1 process x accumulation 4 and 2 processes x accumulation 2 see the same examples in a step.
    """
    per_step = args.batch_size * run.grad_accum
    steps_per_epoch = len(examples) // (per_step * run.world_size)
    epoch, within = divmod(step, steps_per_epoch)
    mine = data.epoch_order(len(examples), args.seed, epoch)[run.rank::run.world_size]
    chosen = mine[within * per_step:(within + 1) * per_step]
    batches = []
    for i in range(run.grad_accum):
        batch = data.collate_train([examples[j] for j in chosen[i * args.batch_size:(i + 1) * args.batch_size]], run.pad_id)
        batch["targets"] = next_token_targets(batch.pop("labels"))
        batches.append(batch)
    return batches


def cosine_lr(step, total_steps, warmup_steps):
    """Linear warmup over warmup_steps (step 0 gets 1 / warmup_steps, step warmup_steps - 1 gets 1),
    then cosine decay toward 0 at total_steps (Choice T6); a multiplier of --lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------------------------
# One optimizer step


def forward(model, batch, run):
    with run.autocast():
        return model(input_ids=batch["input_ids"].to(run.device), attention_mask=batch["attention_mask"].to(run.device),
                     use_cache=False).logits                                   # (B, T, V')


def rng_snapshot(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(snapshot, device):
    torch.set_rng_state(snapshot["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(snapshot["cuda"], device)


@dataclass
class RewardWindow:
    """An ARKD action awaiting its reward: the step that chose it, micro-batch 0 with its teacher
    logits and this rank's random state before its forward (to replay its dropout masks), and the
    mean statistics of micro-batch 0 (all ranks) before the update."""
    step: int
    before: dict
    rng: dict
    batch: dict
    teacher_logits: torch.Tensor

    def closes_after(self, step, args, run):
        return step + 1 - self.step >= args.reward_every or step + 1 == run.total_steps


def train_step(args, run, model, teacher, optimizer, policy, batches, step, window=None, teacher_optimizer=None):
    """One optimizer step of any method. Returns (the step's log row, the open reward window)."""
    student = model.module if run.world_size > 1 else model
    local_tokens = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    # The denominator is the step's response tokens on all ranks, known before any backward (T1).
    n_tokens = max(float(all_reduce_sum(torch.tensor([float(local_tokens)], dtype=torch.float64))), 1.0)
    rng0 = rng_snapshot(run.device)                         # micro-batch 0's dropout masks (T3)
    sums = torch.zeros(len(STAT_NAMES) + 3, dtype=torch.float64, device=run.device)   # stats, losses, tokens
    alpha, row = None, {"step": step}
    for i, batch in enumerate(batches):
        # DDP syncs gradients on the last micro-batch only; no_sync must wrap the forward too.
        sync = model.no_sync() if run.world_size > 1 and i < len(batches) - 1 else contextlib.nullcontext()
        with sync:
            logits = forward(model, batch, run)
            targets = batch["targets"].to(run.device)
            if args.method in ("sft", "seqkd"):
                loss = F.cross_entropy(logits[..., :run.vocab_size].flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
            else:
                with torch.no_grad() if teacher_optimizer is None else contextlib.nullcontext():   # OKD: LoRA learns
                    teacher_logits = forward(teacher, batch, run)
                out = kd_pass(logits, teacher_logits, targets != IGNORE_INDEX, args.tau, run.vocab_size, args.chunk_tokens,
                              target_ids=targets, inplace_grad=teacher_optimizer is None, atkd=run.strategy[0] == "atkd",
                              akl=run.strategy[0] == "akl" or policy is not None)   # the head search only when read
                if i == 0:                                  # alpha is needed before the first backward (T2)
                    stats0 = all_reduce_sum(out.stats)      # every rank must choose the same alpha
                    if policy is None:                      # a rule; akl and atkd weigh each token instead
                        alpha = None if run.strategy[0] in ("akl", "atkd") else strategy_alpha(run.strategy, step, run.total_steps, stats0)
                    elif window is None and torch.isfinite(stats0).all():   # a new action for --reward_every steps
                        before = stat_means(stats0)
                        state = make_state(before, step / run.total_steps, policy.last_alpha, policy.last_reward)
                        alpha = policy.act(state)
                        window = RewardWindow(step, before, rng0, batch, teacher_logits)
                        row.update(state_log_fkl=float(state[0]), state_log_rkl=float(state[1]))
                    else:
                        alpha = policy.last_alpha           # the open action holds
                if run.strategy[0] == "atkd":
                    per_token = atkd_loss(out.tckd, out.nckd, atkd_easy(out.unc), args.atkd_lam)
                else:
                    per_token = mix(out.fkl, out.rkl, out.akl_alpha if alpha is None else alpha)
                loss = per_token.sum() + args.lm_weight * out.ce.sum()
                if teacher_optimizer is not None:           # OKD: the LoRA's own loss, from the same forward
                    teacher_loss = okd_teacher_loss(logits, teacher_logits, targets, args, run)
                    (teacher_loss * run.world_size / n_tokens).backward()
                    sums[-2] += teacher_loss.detach().double()
                sums[:len(STAT_NAMES)] += out.stats
            (loss * run.world_size / n_tokens).backward()   # DDP averages over ranks: undo it (T1)
            sums[-3] += loss.detach().double()             # on the device: no sync per micro-batch
            sums[-1] += float(batch["attention_mask"].sum())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip))
    if math.isfinite(grad_norm):                            # the same norm on every rank: grads are synced
        optimizer.step()
        if teacher_optimizer is not None:
            step_lora(teacher, teacher_optimizer, args, run)
    optimizer.zero_grad(set_to_none=True)
    if teacher_optimizer is not None:
        teacher_optimizer.zero_grad(set_to_none=True)
    if window is not None and window.closes_after(step, args, run):
        after = stat_means(reward_stats(student, window, args, run))
        reward = immediate_reward(window.before["fkl"], window.before["rkl"], after["fkl"], after["rkl"])
        row["reward"] = reward if math.isfinite(reward) else None
        if not math.isfinite(reward):
            policy.drop_action()                            # a non-finite step teaches nothing
        elif policy.store_reward(reward):                   # M rewards stored: one REINFORCE update
            row.update(policy.update())
        window = None
    sums = all_reduce_sum(sums)                             # logging only: one small collective, not three
    # The teacher's entropy depends on its logits alone: not finite means the teacher is the cause (T4).
    row.update(loss=float(sums[-3]) / n_tokens, grad_norm=grad_norm, step_tokens=float(sums[-1]),
               teacher_finite=math.isfinite(float(sums[STAT_NAMES.index("teacher_entropy")])))
    if args.method in ("kd", "okd"):
        log_kd(row, sums, n_tokens, alpha, policy, run.strategy[0] == "akl", teacher_optimizer is not None)
    return row, window


def log_kd(row, sums, n_tokens, alpha, policy, akl, okd):
    """The KD part of a step's log row: alpha (AKL: its mean weight; ATKD: none), every statistic's
    token mean, the LoRA's loss (OKD) and the policy's Beta (ARKD)."""
    means = stat_means(sums[:len(STAT_NAMES)])
    if not (akl or policy is not None):     # the AKL head search did not run (kd_pass akl=False)
        del means["akl_alpha"]
    row.update(alpha=means["akl_alpha"] if akl else alpha, **{k: v for k, v in means.items() if k != "tokens"})
    if okd:
        row["teacher_loss"] = float(sums[-2]) / n_tokens
    if policy is not None:
        row["beta_a"], row["beta_b"] = policy.last_beta


def okd_teacher_loss(logits, teacher_logits, targets, args, run):
    """OKD's loss for the teacher's LoRA, summed over the response tokens (method.md 8):
    a_t KL(q || p) + (1 - a_t) CE(p, reference), p the adapted teacher, q the student (detached).
    kd_pass with the roles swapped computes KL(q || p) as its "FKL", with the closed-form gradient
    tau (p - q) for the teacher's logits, and the teacher's CE: the same memory bound as the rest."""
    back = kd_pass(teacher_logits, logits.detach(), targets != IGNORE_INDEX, args.tau, run.vocab_size,
                   args.chunk_tokens, target_ids=targets, akl=False)
    return (args.okd_a_t * back.fkl + (1 - args.okd_a_t) * back.ce).sum()


def step_lora(teacher, teacher_optimizer, args, run):
    """OKD: one step of the teacher's LoRA, its gradients averaged over ranks and clipped like the student's."""
    params = lora_parameters(teacher)
    if run.world_size > 1:                  # the teacher is not DDP-wrapped: average as DDP does, so ranks agree
        flat = all_reduce_sum(torch.cat([p.grad.flatten() for p in params])) / run.world_size
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    teacher_optimizer.step()


@torch.no_grad()
def reward_stats(student, window, args, run):
    """Summed kd_pass stats of micro-batch 0 rerun after the update, with the dropout masks of its
    training forward (T3): FKL' and RKL' differ from FKL and RKL only by the update."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        restore_rng(window.rng, run.device)
        logits = forward(student, window.batch, run)
    targets = window.batch["targets"].to(run.device)
    # Summed over ranks: the reward, like the state, belongs to the whole micro-batch 0.
    return all_reduce_sum(kd_pass(logits, window.teacher_logits, targets != IGNORE_INDEX, args.tau, run.vocab_size,
                                  args.chunk_tokens, target_ids=targets, akl=False).stats)   # FKL' and RKL' only


# ----------------------------------------------------------------------------------------------
# Checkpoints (Choice T7): OUT/last, written atomically; the one before it kept as OUT/last.old


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file and what is wrong."""


@dataclass
class Progress:
    """The counters a checkpoint carries besides models, optimizers and random states."""
    step: int = 0
    best: float = -1.0
    bad_steps: int = 0
    skipped: int = 0


def find_checkpoint(out):
    """OUT/last, or OUT/last.old when a crash came between the two renames of a save."""
    for candidate in (os.path.join(out, "last"), os.path.join(out, "last.old")):
        if os.path.isdir(candidate):
            return candidate
    return None


def save_model(directory, student, tokenizer, info, training_state=None):
    """Plain Hugging Face weights (safetensors) that AutoModelForCausalLM loads, info.json, and for a
    checkpoint training_state.pt (plain tensors and numbers)."""
    student.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if training_state is not None:
        torch.save(training_state, os.path.join(directory, "training_state.pt"))


def save_checkpoint(args, run, student, tokenizer, optimizer, policy, progress, window, teacher=None, teacher_optimizer=None):
    """Every rank's random state (and its reward window's) is gathered, so any rank count resumes exactly."""
    mine = {"rng": rng_snapshot(run.device), "window_rng": window.rng if window is not None else None}
    ranks = [mine]
    if run.world_size > 1:                  # rank 0 writes the file, so it needs every rank's state
        ranks = [None] * run.world_size
        dist.all_gather_object(ranks, mine)
    if run.master:
        okd = teacher_optimizer is not None          # OKD: the teacher's LoRA and its optimizer too
        state = {**vars(progress), "optimizer": optimizer.state_dict(), "ranks": ranks,
                 "policy": policy.state_dict() if policy is not None else None,
                 "lora": lora_state_dict(teacher) if okd else None,
                 "teacher_optimizer": teacher_optimizer.state_dict() if okd else None,
                 "window": None if window is None else {"step": window.step, "before": window.before}}
        write_atomic(os.path.join(args.out, "last"), functools.partial(
            save_model, student=student, tokenizer=tokenizer, info={**vars(args), "world_size": run.world_size},
            training_state=state), keep_old=True)
    barrier()                               # no rank runs on while the checkpoint is being written


def checkpoint_to_resume(args, run):
    """The checkpoint directory to resume from (None for a fresh run), after checking that it loads."""
    checkpoint = find_checkpoint(args.out)
    if args.resume_previous:
        checkpoint = os.path.join(args.out, "last.old")
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--resume_previous: {checkpoint} does not exist")
    elif not args.resume:
        if checkpoint is not None:
            raise FileExistsError(f"{args.out} already holds a checkpoint: pass --resume or choose another --out")
        return None
    elif checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {args.out}")
    problem = checkpoint_problem(checkpoint, args, run)
    if problem:
        previous = os.path.join(args.out, "last.old")
        usable = not args.resume_previous and checkpoint != previous and os.path.isdir(previous) \
            and not checkpoint_problem(previous, args, run)
        raise CheckpointError(f"cannot resume: {problem}" + (
            f". The checkpoint before it, {previous}, loads: pass --resume_previous to continue from it "
            "(the steps since it are trained again)" if usable else ""))
    return checkpoint


def checkpoint_problem(checkpoint, args, run):
    """None when `checkpoint` can be resumed under these flags, else what is wrong, naming the file."""
    info_path = os.path.join(checkpoint, "info.json")
    try:
        with open(info_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        return f"{info_path} does not load ({err})"
    saved_world = saved.get("world_size")
    differ = [f"{k}={saved.get(k)!r} (now {getattr(args, k)!r})" for k in RUN_DEFINING if saved.get(k) != getattr(args, k)]
    differ += [f"world_size={saved_world!r} (now {run.world_size})"] if saved_world != run.world_size else []
    if differ:
        return f"{checkpoint} was written with other settings: " + ", ".join(differ)
    from safetensors import safe_open
    for name in ("training_state.pt", "model.safetensors"):
        path = os.path.join(checkpoint, name)
        try:
            if name == "training_state.pt":
                torch.load(path, map_location="cpu", weights_only=True)
            else:
                safe_open(path, "pt").keys()
        except Exception as err:             # truncated, corrupt, missing or not plain tensors
            return f"{path} does not load ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
    return None


def resume(checkpoint, args, run, examples, teacher, optimizer, policy, teacher_optimizer=None):
    """Progress and the open reward window of the checkpoint; restores optimizers, policy, LoRA, random states."""
    state = torch.load(os.path.join(checkpoint, "training_state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if teacher_optimizer is not None:
        with torch.no_grad():
            for name, p in teacher.named_parameters():
                if name in state["lora"]:
                    p.copy_(state["lora"][name])
        teacher_optimizer.load_state_dict(state["teacher_optimizer"])
    if policy is not None:
        policy.load_state_dict(state["policy"])
    mine = state["ranks"][run.rank]
    restore_rng(mine["rng"], run.device)
    window = None
    if state["window"] is not None:         # recompute the window's batch and teacher logits
        batch0 = micro_batches(examples, state["window"]["step"], args, run)[0]
        with torch.no_grad():
            teacher_logits = forward(teacher, batch0, run)
        window = RewardWindow(state["window"]["step"], state["window"]["before"], mine["window_rng"], batch0, teacher_logits)
    print0(f"resumed from {checkpoint} at step {state['step']}")
    return Progress(state["step"], state["best"], state["bad_steps"], state["skipped"]), window


# ----------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl on rank 0, strict JSON, never ahead of the checkpoint it resumes from


class MetricsLog:
    """One JSON row per step plus validation rows. Non-finite numbers are written as null (and
    counted); on resume the rows after the checkpoint, and a torn last line, are dropped."""

    def __init__(self, path, resume_step, master):
        self.path, self.file, self.nonfinite_rows = path, None, 0
        if not master:
            return
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except ValueError:
                    print0(f"warning: {path}:{number}: dropped a torn line (the run stopped while writing it)")
                    continue
                if row["step"] < resume_step or ("val_rougeL" in row and row["step"] <= resume_step):
                    kept.append(line + "\n")
        write_atomic(path, "".join(kept))   # a fresh run starts an empty log
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row):
        if self.file is None:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
        self.nonfinite_rows += clean != row
        self.file.write(json.dumps(clean, allow_nan=False) + "\n")

    def flush(self):
        """Rows written so far reach the disk: called before a checkpoint is declared done."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())


class ProgressLine:
    """A progress bar in a terminal; in a log file a plain line every 30 seconds."""

    def __init__(self, run, start_step, label):
        from tqdm import tqdm
        self.run, self.label, self.last_print = run, label, 0.0
        tty = run.master and sys.stderr.isatty()
        self.bar = tqdm(total=run.total_steps, initial=start_step, desc=label, disable=not tty)

    def update(self, row):
        text = f"loss {row['loss']:.4f}" + (f" alpha {row['alpha']:.3f}" if row.get("alpha") is not None else "")
        if not self.bar.disable:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.run.master and (time.time() - self.last_print >= 30 or row["step"] + 1 == self.run.total_steps):
            self.last_print = time.time()
            print(f"{self.label} step {row['step'] + 1}/{self.run.total_steps}: {text}, "
                  f"{row['step_seconds']:.2f} s/step", flush=True)


# ----------------------------------------------------------------------------------------------
# Training


def build_training(args, run, student, teacher):
    """(the model to train, possibly DDP-wrapped; its optimizer; OKD's LoRA optimizer; ARKD's policy)."""
    model = student if run.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        student, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    teacher_optimizer = torch.optim.AdamW(lora_parameters(teacher), lr=args.okd_lr or args.lr, weight_decay=0.0) \
        if args.method == "okd" else None                   # its own state: other parameters (Choice O4)
    policy = ARKDPolicy(buffer_size=args.policy_buffer, lr=args.policy_lr, entropy_coef=args.policy_entropy,
                        seed=args.seed) if args.method == "kd" and args.strategy == "arkd" else None
    return model, optimizer, teacher_optimizer, policy


def validate(args, run, student, tokenizer, val_examples, val_records, progress, metrics):
    """Mean Rouge-L of sampled responses to the dev prompts (the same on every rank); keeps OUT/best."""
    student.eval()
    predictions = evaluate.generate(student, tokenizer, [e["prompt_ids"] for e in val_examples], args.seed,
                                    args.gen_batch_size, args.max_new_tokens, progress=False)
    student.train()
    score = sum(evaluate.rouge_l(p, val_records[e["index"]]["references"])
                for p, e in zip(predictions, val_examples)) / len(val_examples)
    print0(f"step {progress.step}: validation Rouge-L {score:.2f}")
    metrics.write({"step": progress.step, "val_rougeL": score})
    if score > progress.best:
        progress.best = score
        if run.master:
            write_atomic(os.path.join(args.out, "best"), functools.partial(
                save_model, student=student, tokenizer=tokenizer, info={"step": progress.step, "val_rougeL": score}))
    return score


def count_bad_step(row, progress, args):
    """Choice T4: a step whose gradient is not finite made no update. Returns the error that stops
    the run after --max_bad_steps of them in a row (None otherwise)."""
    if math.isfinite(row["grad_norm"]):
        progress.bad_steps = 0
        return None
    progress.bad_steps, progress.skipped = progress.bad_steps + 1, progress.skipped + 1
    cause = "" if row["teacher_finite"] else f": the teacher {args.teacher} produced non-finite logits"
    print0(f"step {row['step']}: non-finite loss or gradient, step skipped{cause}")
    if progress.bad_steps >= args.max_bad_steps:
        return f"step {row['step']}: {args.max_bad_steps} steps in a row had a non-finite loss or gradient{cause}"
    return None


def main(argv=None):
    args = parse_args(argv)
    run = start(args)
    usage = data.Usage(run.device)              # seconds and peak memory of each phase: OUT/usage.json
    checkpoint = checkpoint_to_resume(args, run)
    torch.manual_seed(args.seed + run.rank)
    tokenizer, student, teacher = load_models(args, run, checkpoint)
    shapes = {"student": evaluate.model_shape(student), "teacher": teacher and evaluate.model_shape(teacher)}
    train_dir = args.data_dir
    if args.method == "seqkd":              # SeqKD trains on the teacher's samples (T5)
        usage.end("load")
        train_dir = args.seqkd_data or os.path.join(args.out, "seqkd_data")
        prompts = evaluate.build_seqkd_data(teacher, tokenizer, args.data_dir, train_dir, args.train_examples,
                                            args.seed, args.gen_batch_size, args.max_new_tokens)
        usage.end("seqkd data", prompts=prompts)
        teacher = shapes["teacher"] = None                  # the steps hold no teacher
    examples, val_examples, val_records = load_training_data(args, run, tokenizer, train_dir)
    model, optimizer, teacher_optimizer, policy = build_training(args, run, student, teacher)
    progress, window = Progress(), None
    if checkpoint:
        progress, window = resume(checkpoint, args, run, examples, teacher, optimizer, policy, teacher_optimizer)
    usage.end("load")
    metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), progress.step if checkpoint else None, run.master)
    label = f"kd {args.strategy}" if args.method == "kd" else args.method
    line, first_step, history = ProgressLine(run, progress.step, label), progress.step, []
    while progress.step < run.total_steps:
        started = time.perf_counter()
        for opt, peak in ((optimizer, args.lr), (teacher_optimizer, args.okd_lr or args.lr)):
            for group in opt.param_groups if opt else ():  # the lr is a pure function of the step
                group["lr"] = peak * cosine_lr(progress.step, run.total_steps, run.warmup_steps)
        batches = micro_batches(examples, progress.step, args, run)
        row, window = train_step(args, run, model, teacher, optimizer, policy, batches, progress.step, window,
                                 teacher_optimizer)
        usage.end("step", positions=sum(b["input_ids"].numel() for b in batches),
                  sequences=sum(len(b["input_ids"]) for b in batches))
        stop, seconds = count_bad_step(row, progress, args), time.perf_counter() - started
        row.update(lr=optimizer.param_groups[0]["lr"], skipped_steps=progress.skipped, step_seconds=seconds,
                   tokens_per_second=row.pop("step_tokens") / seconds)
        history.append(row)
        metrics.write(row)
        if stop:
            metrics.flush()
            raise RuntimeError(stop)
        line.update(row)
        progress.step += 1
        scheduled = progress.step == run.total_steps or (args.eval_every and progress.step % args.eval_every == 0)
        stopping = bool(args.stop_after) and progress.step - first_step >= args.stop_after
        if scheduled:
            row["val_rougeL"] = validate(args, run, student, tokenizer, val_examples, val_records, progress, metrics)
            usage.end("validation", prompts=len(val_examples))
        if scheduled or stopping:
            metrics.flush()                                 # the log never lags its checkpoint
            save_checkpoint(args, run, student, tokenizer, optimizer, policy, progress, window, teacher, teacher_optimizer)
            usage.end("checkpoint")
        if stopping:
            print0(f"stopping after step {progress.step} as asked (--stop_after): continue with --resume")
            break
    finish(args, run, metrics, progress)
    if run.master:
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        trainable += sum(p.numel() for p in lora_parameters(teacher)) if teacher is not None else 0
        usage.write(os.path.join(args.out, "usage.json"), kind="train", method=args.method, strategy=args.strategy,
                    micro_batch=args.batch_size, grad_accum=run.grad_accum, world_size=run.world_size, bf16=run.bf16,
                    trainable_params=trainable, **shapes)
    return {"student": student, "teacher": teacher, "policy": policy, "history": history, "best": progress.best}


def finish(args, run, metrics, progress):
    if run.master:
        metrics.file.close()
        if metrics.nonfinite_rows:
            print0(f"warning: {metrics.nonfinite_rows} rows of {metrics.path} held non-finite values, written as null")
        if args.method == "kd":
            evaluate.plot_run(args.out)
        print0(f"done: step {progress.step} of {run.total_steps}, best validation Rouge-L {progress.best:.2f}, "
               f"{progress.skipped} skipped steps")
    if run.world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["plot"]:
            evaluate.plot_run(sys.argv[2])
        else:
            main()
    except (ValueError, OSError) as err:    # bad settings or files: the message, not a traceback
        sys.exit(f"arkd.py: {err}")
