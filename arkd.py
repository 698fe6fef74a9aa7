"""ARKD training: SFT, SeqKD and KD with every alpha strategy (ARKD included), on one GPU or many: the
training loop of docs/method.md on top of losses.py and policy.py (the maths). Every strategy is
trained by the same loop, so the comparison is fair. train_step is one ARKD step, top to bottom:

    token count -> micro-batch 0's statistics -> choose_alpha (a strategy rule, or policy.act)
    -> alpha FKL + (1 - alpha) RKL -> backward over the micro-batches -> clip_and_step
    -> close_reward_window: micro-batch 0 again after the step -> the reward -> REINFORCE every M

    python arkd.py --method kd --strategy arkd --teacher T --student S --data_dir D --out RUN [--resume]
    torchrun --nproc_per_node=8 arkd.py [--shard fsdp] ...   # DDP (nccl on CUDA, gloo on CPU) or FSDP2

Choices of docs/method.md made (and marked) here: one token-count denominator (T1), alpha from micro-batch 0
(T2), replayed dropout masks (T3), skipped non-finite steps (T4), SeqKD (T5), the schedule (T6), the
checkpoint (T7), SGO (T8), FSDP2 (T9); O3, O4; the cached teacher (8.6-8.8).
"""
import argparse
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import evaluate
import plumbing
from plumbing import barrier, print0, world, write_atomic
from lora import add_lora, lora_parameters, lora_state_dict
from losses import (DIVERGENCES, IGNORE_INDEX, STAT_NAMES, STEP_RULES, atkd_easy, atkd_loss, kd_pass, mix,
                    cached_teacher_logits, next_token_targets, parse_strategy, stat_means, strategy_alpha, teacher_summary)
from policy import ARKDPolicy, all_reduce_sum, immediate_reward, make_state

# Flags that define a run: a checkpoint resumes only under the same values (and world size).
RUN_DEFINING = ("method", "strategy", "teacher", "student", "data_dir", "max_prompt", "max_total", "tau", "lm_weight", "lr",
                "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "seed", "reward_every",
                "policy_buffer", "policy_lr", "policy_entropy", "seqkd_data", "train_examples", "atkd_lam",
                "okd_rank", "okd_scale", "okd_lr", "okd_a_t", "sgo_ratio", "shard",
                "gen_batch_size", "sgo_adaptive", "sgo_init", "sgo_buffer",
                "teacher_cache")


# ----------------------------------------------------------------------------------------------
# Settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ARKD / KD / SFT training (see the module docstring).")
    # what to train
    p.add_argument("--method", default="kd", choices=("sft", "seqkd", "kd", "okd", "cache"), help="sft, seqkd: CE on "
                   "references, teacher samples; kd; okd: the teacher's LoRA trains too; cache: the teacher's top-k, once")
    p.add_argument("--teacher_cache", default=None, help="kd: from a --method cache folder, no teacher loaded (8.6-8.8)")
    p.add_argument("--cache_k", type=int, default=64, help="cache: teacher log-probs kept per position")
    p.add_argument("--strategy", default="arkd", help="kd: fkl, rkl, fixed:A, linear:A0,A1, akl, arkd, ...")
    p.add_argument("--teacher", default="MiniLLM/teacher-gpt2-1.5B", help="teacher model (kd, seqkd)")
    p.add_argument("--student", default="MiniLLM/init-gpt2-120M", help="student initialisation")
    p.add_argument("--data_dir", default=None, help="MiniLLM data (a folder, a file); default: the Hub")
    p.add_argument("--max_prompt", type=int, default=data.MAX_PROMPT_TOKENS, help="longer prompts are dropped (counted)")
    p.add_argument("--max_total", type=int, default=data.MAX_TOTAL_TOKENS, help="prompt + response cut at this (counted)")
    p.add_argument("--seqkd_data", default=None, help="seqkd: where teacher samples go (default OUT/seqkd_data)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, plots")
    # objective
    p.add_argument("--tau", type=float, default=1.0, help="temperature; the KD loss is scaled by tau^2")
    p.add_argument("--lm_weight", type=float, default=0.0, help="weight of the reference CE added to KD")
    p.add_argument("--sgo_ratio", type=float, default=0.0, help="kd: share of responses the student samples (GKD's lambda)")
    p.add_argument("--sgo_adaptive", action="store_true", help="kd: DistiLLM's adaptive share (Choice 8.4)")
    p.add_argument("--sgo_init", type=float, default=0.0, help="--sgo_adaptive: the share at the start")
    p.add_argument("--sgo_buffer", type=int, default=0, help="kd: replay the last C student responses (DistiLLM: 1000; 8.5)")
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
    p.add_argument("--shard", default="ddp", choices=("ddp", "fsdp"), help="several processes: DDP, or FSDP2 (T9)")
    p.add_argument("--seed", type=int, default=1, help="seed of data order, dropout and the policy")
    # ARKD policy
    p.add_argument("--reward_every", type=int, default=1, help="steps one action spans (Choice R1)")
    p.add_argument("--policy_buffer", type=int, default=8, help="actions per REINFORCE update (M)")
    p.add_argument("--policy_lr", type=float, default=3e-3, help="policy Adam learning rate")
    p.add_argument("--policy_entropy", type=float, default=0.1, help="entropy bonus c_H")
    # validation, checkpoints, logging
    p.add_argument("--eval_every", type=int, default=200, help="validate and checkpoint every N steps (0: at the end)")
    p.add_argument("--val_examples", type=int, default=500, help="dev prompts used for validation Rouge-L")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens sampled per prompt (validation, SeqKD)")
    p.add_argument("--gen_batch_size", type=int, default=16, help="prompts per generate call (validation, SeqKD, SGO)")
    p.add_argument("--train_examples", type=int, default=0, help="use the first N training records (0: all)")
    p.add_argument("--keep_checkpoints", type=int, default=2, choices=(1, 2), help="OUT/last, and OUT/last.old")
    p.add_argument("--report_to", default="none", choices=("none", "tensorboard"), help="metrics also in OUT/tensorboard")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--resume_previous", action="store_true", help="continue from OUT/last.old (OUT/last does not load)")
    p.add_argument("--stop_after", type=int, default=0, help="leave, checkpointed, after N steps (a job's time limit)")
    p.add_argument("--max_bad_steps", type=int, default=10, help="stop after N non-finite steps in a row")
    args = p.parse_args(argv)
    if args.method == "kd":
        parse_strategy(args.strategy)                  # unknown names fail here, before any work
    for name in ("lr", "batch_size", "epochs", "reward_every", "policy_buffer", "val_examples", "max_bad_steps", "max_prompt",
                 "gen_batch_size", "cache_k"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0")
    if args.max_total <= args.max_prompt:
        p.error(f"--max_total ({args.max_total}) must exceed --max_prompt ({args.max_prompt}): responses need room")
    if args.tau <= 0 or args.lm_weight < 0 or not 0 <= args.warmup_ratio < 1 or not 0 <= args.sgo_ratio <= 1:
        p.error("--tau must be > 0, --lm_weight >= 0, --warmup_ratio in [0, 1), --sgo_ratio in [0, 1]")
    if (args.sgo_ratio or args.sgo_adaptive) and args.method != "kd":
        p.error("--sgo_ratio and --sgo_adaptive need --method kd: the teacher's distribution is a sampled response's target")
    if args.sgo_adaptive and args.sgo_ratio or args.sgo_init and not args.sgo_adaptive or not 0 <= args.sgo_init <= 1:
        p.error("--sgo_init (in [0, 1]) sets --sgo_adaptive's starting share, which takes the place of --sgo_ratio")
    if args.sgo_buffer < 0 or args.sgo_buffer and not (args.sgo_ratio or args.sgo_adaptive):
        p.error("--sgo_buffer must be >= 0 and holds student responses: it needs --sgo_ratio or --sgo_adaptive")
    if not (0 <= args.atkd_lam <= 1 and 0 <= args.okd_a_t <= 1) or args.okd_rank < 1:
        p.error("--atkd_lam and --okd_a_t must lie in [0, 1], --okd_rank must be >= 1")
    if args.shard == "fsdp" and args.method == "okd":
        p.error("--shard fsdp trains --method sft, seqkd and kd: OKD's teacher LoRA is not sharded, use --shard ddp")
    if args.teacher_cache and (args.method != "kd" or args.tau != 1 or args.sgo_ratio or args.sgo_adaptive
                               or args.strategy.startswith("ab:")):
        p.error("--teacher_cache trains --method kd at --tau 1 on the data's responses (no --sgo_*), every strategy but "
                "ab (its sum over the tail is not the tail bucket's): docs/method.md 8.8")
    if args.method == "kd" and args.strategy == "atkd" and args.tau != 1:
        p.error("--strategy atkd is defined at temperature 1: drop --tau")     # Choice A3
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
    cache: object = None            # --teacher_cache: a TeacherCache
    vocab_size: int = 0
    pad_id: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    steps_per_epoch: int = 0

    @property
    def master(self):               # rank 0 logs, checkpoints and plots
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def start(args):
    """Joins the other processes (torchrun) and fixes the run's device, precision and accumulation."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()       # one bar per run is enough: ours
    models = [args.student] + ([args.teacher] if args.method != "sft" and not args.teacher_cache else [])
    for path in models:                            # missing paths fail in seconds, before any load
        plumbing.check_model_path(path)
    if args.data_dir is not None:
        data.dataset_file("dolly_train", args.data_dir)
    rank, world_size, device = plumbing.init_processes()
    grad_accum = args.grad_accum
    if grad_accum == 0:
        if 32 % (args.batch_size * world_size):
            raise ValueError(f"global batch 32 is not a multiple of --batch_size {args.batch_size} x "
                             f"{world_size} processes: set --grad_accum")
        grad_accum = 32 // (args.batch_size * world_size)
    if 0 < args.sgo_buffer < args.batch_size * grad_accum * world_size:      # Choice 8.5
        raise ValueError(f"--sgo_buffer {args.sgo_buffer} holds less than one step's {args.batch_size * grad_accum * world_size}"
                         " examples")
    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda")
    # OKD's student learns by FKL alone (method.md 8); SFT and SeqKD have no strategy.
    strategy = parse_strategy(args.strategy) if args.method == "kd" else ("fkl", ()) if args.method == "okd" else None
    return Run(rank, world_size, device, bf16, grad_accum, strategy)


# ----------------------------------------------------------------------------------------------
# Models and data


def load_models(args, run, checkpoint=None):
    """(tokenizer, student, teacher or None); refuses a teacher whose tokenizer differs (method.md 1)."""
    tokenizer = plumbing.load_tokenizer(args.student)
    run.vocab_size, run.pad_id = len(tokenizer), tokenizer.pad_token_id
    teacher = None
    if args.method != "sft" and not args.teacher_cache:
        teacher_tokenizer = plumbing.load_tokenizer(args.teacher)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {args.teacher} ({len(teacher_tokenizer)} tokens) and student {args.student} "
                             f"({len(tokenizer)} tokens) use different tokenizers: distillation needs one")
        dtype = torch.bfloat16 if run.bf16 else torch.float32
        teacher = plumbing.load_model(args.teacher, run.device, dtype, run.vocab_size).eval().requires_grad_(False)
        if args.method == "okd":                   # the teacher's LoRA trains with the student (method.md 8)
            add_lora(teacher, args.okd_rank, args.okd_scale)
    student = plumbing.load_model(checkpoint or args.student, run.device, torch.float32, run.vocab_size).train()
    return tokenizer, student, teacher


def load_training_data(args, run, tokenizer, train_dir):
    """(training examples, dev examples, dev records); fixes run's step counts."""
    records = data.load_records("dolly_train", train_dir)[:args.train_examples or None]
    examples, _ = data.encode_records(tokenizer, records, "dolly_train", args.max_prompt, args.max_total)
    val_records = data.load_records("dolly_dev", args.data_dir)[:args.val_examples]
    val_examples, _ = data.encode_records(tokenizer, val_records, "dolly_dev", args.max_prompt, args.max_total)
    steps_per_epoch = len(examples) // (args.batch_size * run.grad_accum * run.world_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} training examples are fewer than one global batch")
    run.total_steps, run.steps_per_epoch = args.max_steps or args.epochs * steps_per_epoch, steps_per_epoch
    run.warmup_steps = int(args.warmup_ratio * run.total_steps)
    return examples, val_examples, val_records


def micro_batches(examples, step, args, run, student=None, tokenizer=None, progress=None):
    """The micro-batches of step `step` on this rank, a pure function of the step (with student-generated data,
    of the student and the buffer too). Each epoch has a seeded order; rank r takes every world_size-th
    example (1 process x 4 micro-batches and 2 x 2 see the same step). A share of the examples, spread
    evenly, get the student's own response (student_generated: T8, 8.4, 8.5)."""
    per_step, world_size = args.batch_size * run.grad_accum, run.world_size
    epoch, within = divmod(step, len(examples) // (per_step * world_size))
    order = data.epoch_order(len(examples), args.seed, epoch)[within * per_step * world_size:]
    step_examples = [examples[j] for j in order[:per_step * world_size]]     # global position j: rank j % world_size
    progress = progress or Progress(sgo_share=args.sgo_ratio)          # the run's share and buffer, or --sgo_ratio's
    if student is not None and progress.sgo_share > 0:
        student_generated(step_examples, step, args, run, student, tokenizer, progress)
    chosen = step_examples[run.rank::world_size]
    batches = []
    for part in (chosen[i * args.batch_size:(i + 1) * args.batch_size] for i in range(run.grad_accum)):
        batch = data.collate_train(part, run.pad_id)
        batch["targets"] = next_token_targets(batch.pop("labels"))
        batch["index"] = torch.tensor([e["index"] for e in part])            # the cache's key of each row
        batches.append(batch)
    return batches


def shared_positions(n, share):
    """The positions j < n with floor((j + 1) share) > floor(j share): a share of n, spread evenly (T8)."""
    return [j for j in range(n) if math.floor((j + 1) * share) > math.floor(j * share)]


def student_generated(step_examples, step, args, run, student, tokenizer, progress):
    """The student's responses at the shared positions of step_examples (all ranks', global order), in place.
    With --sgo_buffer C, once C are held, a share k / K of them (spread evenly) are drawn from the buffer
    without replacement, seeded by (seed, step); fresh ones join it, oldest out (8.5: one buffer, all ranks)."""
    positions = shared_positions(len(step_examples), progress.sgo_share)
    fresh, replayed = positions, []
    if args.sgo_buffer and len(progress.sgo_buffer) >= args.sgo_buffer:
        kept = set(shared_positions(len(positions), 1 - step / run.total_steps))     # a share 1 - k / K fresh
        fresh = [j for i, j in enumerate(positions) if i in kept]
        replayed = [j for i, j in enumerate(positions) if i not in kept]
    draws = torch.randperm(len(progress.sgo_buffer), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
    pairs = [progress.sgo_buffer[d] for d in draws[:len(replayed)].tolist()]
    pairs += [(step_examples[j]["prompt_ids"], response) for j, response in zip(fresh, on_policy_responses(
        student, tokenizer, [step_examples[j] for j in fresh], args, step))]
    for j, (prompt, response) in zip(replayed + fresh, pairs):
        step_examples[j] = {"index": step_examples[j]["index"], "prompt_ids": prompt, "input_ids": prompt + response,
                            "labels": [IGNORE_INDEX] * len(prompt) + response}
    if args.sgo_buffer:
        progress.sgo_buffer = (progress.sgo_buffer + pairs[len(replayed):])[-args.sgo_buffer:]


def on_policy_responses(student, tokenizer, chosen, args, step):
    """The student's responses (eval mode) to the prompts of `chosen`, all ranks' examples of the step in
    global order: --gen_batch_size chunks, chunk c sampled by rank c mod W with seed (seed, step, c) and
    gathered (evaluate.generate_ids), each cut at its first EOS and at its own length limit (Choice T8)."""
    limits = [min(args.max_new_tokens, args.max_total - len(e["prompt_ids"])) for e in chosen]
    was_training = student.training
    student.eval()
    responses = evaluate.generate_ids(student, tokenizer, [e["prompt_ids"] for e in chosen], args.seed * 1_000_003 + step,
                                      args.gen_batch_size, max(limits, default=1), progress=False)
    student.train(was_training)
    return [r[:limit] for r, limit in zip(responses, limits)]


def build_seqkd_data(teacher, tokenizer, args, out_dir, part_size=256):
    """SeqKD data: OUT_DIR/dolly/raw.jsonl holds the dev lines, then the training prompts with the teacher's
    sampled responses (Choice T5), written in parts of part_size prompts so that an interrupted run
    resumes. Returns the number of prompts this call sampled."""
    target = os.path.join(out_dir, "dolly", "raw.jsonl")
    if os.path.exists(target):
        return 0
    parts_dir = os.path.join(out_dir, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    train = data.load_records("dolly_train", args.data_dir)[:args.train_examples or None]
    examples, _ = data.encode_records(tokenizer, train, "seqkd prompts", args.max_prompt, args.max_total)
    rank, sampled = world()[0], 0
    for start in range(0, len(examples), part_size):
        part = os.path.join(parts_dir, f"{start:07d}.jsonl")
        if os.path.exists(part):
            continue
        chunk = examples[start:start + part_size]
        sampled += len(chunk)
        samples = evaluate.generate(teacher, tokenizer, [e["prompt_ids"] for e in chunk], args.seed * 7919 + start,
                                    args.gen_batch_size, args.max_new_tokens)
        if rank == 0:
            lines = [data.record_line({**train[e["index"]], "references": [s]}) for e, s in zip(chunk, samples) if s.strip()]
            write_atomic(part, "\n".join(lines) + "\n")
        barrier()
    if rank == 0:
        dev = data.load_records("dolly_dev", args.data_dir)
        lines = [data.record_line(r) for r in dev]
        for name in sorted(os.listdir(parts_dir)):
            with open(os.path.join(parts_dir, name), encoding="utf-8") as f:
                lines += [line.rstrip("\n") for line in f if line.strip()]
        write_atomic(target, "\n".join(lines) + "\n")
    barrier()
    return sampled


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
    """An ARKD action awaiting its reward: the step that chose it, the batch's mean statistics (all ranks)
    before the update, this rank's random state before its forward (its dropout masks), the batch, its teacher logits."""
    step: int
    before: dict
    rng: dict
    batch: dict
    teacher_logits: torch.Tensor

    def closes_after(self, step, args, run):
        return step + 1 - self.step >= args.reward_every or step + 1 == run.total_steps


def train_step(args, run, model, teacher, optimizer, policy, batches, step, window=None, teacher_optimizer=None):
    """One optimizer step of any method. Returns (the step's log row, the open reward window).

    policy: ARKD's policy, or None (every other strategy's alpha is a rule). ARKD's step in order: the
    module docstring's.
    """
    student = getattr(model, "module", model)                  # DDP wraps it; FSDP2 shards it in place
    n_tokens = step_token_count(batches)                        # all ranks, before any backward (T1)
    rng0 = rng_snapshot(run.device)                             # micro-batch 0's dropout masks (T3)
    stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=run.device)     # kd_pass's sums
    totals = {name: torch.zeros((), dtype=torch.float64, device=run.device)          # on the device: no sync
              for name in ("loss", "teacher_loss", "positions")}                    # per micro-batch
    alpha, row = None, {"step": step}
    for i, batch in accumulating(model, batches, run):          # DDP syncs gradients after the last one
        logits = forward(model, batch, run)
        state_read = policy is not None and i == 0 and window is None     # a new action: its state needs AKL
        out, teacher_logits = kd_outputs(args, run, teacher, logits, batch, state_read, teacher_optimizer)
        if i == 0 and out is not None:                          # alpha is needed before the first backward (T2)
            alpha, window = choose_alpha(run, policy, window, all_reduce_sum(out.stats), step,
                                         (rng0, batch, teacher_logits), row)
        loss = micro_batch_loss(args, run, logits, batch, out, alpha)    # summed over its response tokens
        if teacher_optimizer is not None:                       # OKD: the LoRA's own loss, from the same forward
            teacher_loss = okd_teacher_loss(logits, teacher_logits, batch["targets"].to(run.device), args, run)
            (teacher_loss * run.world_size / n_tokens).backward()
            totals["teacher_loss"] += teacher_loss.detach().double()
        (loss * run.world_size / n_tokens).backward()           # DDP averages over ranks: undo it (T1)
        stats += out.stats if out is not None else 0
        totals["loss"] += loss.detach().double()
        totals["positions"] += float(batch["attention_mask"].sum())
    grad_norm = clip_and_step(args, run, student, teacher, optimizer, teacher_optimizer)
    if window is not None and window.closes_after(step, args, run):
        row.update(close_reward_window(args, run, student, policy, window))
        window = None
    # Logging only: one small collective for all the sums, not one each.
    summed = all_reduce_sum(torch.cat([stats, torch.stack(list(totals.values()))]))
    stats, totals = summed[:len(STAT_NAMES)], dict(zip(totals, summed[len(STAT_NAMES):].tolist()))
    # The teacher's entropy depends on its logits alone: not finite means the teacher is the cause (T4).
    row.update(loss=totals["loss"] / n_tokens, grad_norm=grad_norm, step_tokens=totals["positions"],
               teacher_finite=math.isfinite(float(stats[STAT_NAMES.index("teacher_entropy")])))
    if args.method in ("kd", "okd"):
        row.update(kd_log(stats, alpha, policy, run.strategy[0] == "akl"))
        if teacher_optimizer is not None:
            row["teacher_loss"] = totals["teacher_loss"] / n_tokens
    return row, window


def step_token_count(batches):
    """The step's response tokens on all ranks: the one denominator of its loss (Choice T1)."""
    local_tokens = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    return max(float(all_reduce_sum(torch.tensor([float(local_tokens)], dtype=torch.float64))), 1.0)


def accumulating(model, batches, run):
    """(index, micro-batch) pairs, each but the last yielded inside DDP's no_sync(): gradients are then
    synced once per step, and no_sync must wrap the forward as well as the backward. FSDP2 reduces
    every micro-batch's gradient to its shards (the sum is the same; no full gradient is kept)."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            yield i, batch


def kd_outputs(args, run, teacher, logits, batch, state_read, teacher_optimizer):
    """(kd_pass of the student's logits against the teacher's, the teacher's logits); (None, None) for SFT and
    SeqKD. The AKL head search runs where it is read: `akl`, and ARKD's new action's state (state_read)."""
    if args.method in ("sft", "seqkd"):
        return None, None
    with torch.no_grad() if teacher_optimizer is None else contextlib.nullcontext():   # OKD: the LoRA learns
        teacher_logits = teacher_forward(teacher, batch, run, logits)
    targets = batch["targets"].to(run.device)
    kind, numbers = run.strategy
    out = kd_pass(logits, teacher_logits, targets != IGNORE_INDEX, args.tau, run.vocab_size, args.chunk_tokens,
                  target_ids=targets, inplace_grad=teacher_optimizer is None, atkd=kind == "atkd",
                  akl=kind == "akl" or state_read,
                  divergence=(kind, numbers if kind == "ab" else numbers[0] if numbers else 0.0) if kind in DIVERGENCES else None)
    return out, teacher_logits


def choose_alpha(run, policy, window, stats0, step, reward_batch, row):
    """(alpha, window): from micro-batch 0's statistics summed over ranks (every rank trains with the same
    alpha), a strategy's rule (None for akl and atkd: they weigh each token), or for ARKD the policy's
    action on the state, held for --reward_every steps by the window it opens; that window keeps
    reward_batch (the random state before micro-batch 0's forward, the batch, its teacher logits)."""
    if policy is None:
        rule = run.strategy[0] in STEP_RULES              # akl, atkd weigh each token
        return (strategy_alpha(run.strategy, step, run.total_steps, stats0) if rule else None), window
    if window is not None or not torch.isfinite(stats0).all():
        return policy.last_alpha, window                        # the open action holds
    before = stat_means(stats0)
    state = make_state(before, step / run.total_steps, policy.last_alpha, policy.last_reward)
    row.update(state_log_fkl=float(state[0]), state_log_rkl=float(state[1]), akl_alpha=before["akl_alpha"])
    return policy.act(state), RewardWindow(step, before, *reward_batch)


def micro_batch_loss(args, run, logits, batch, out, alpha):
    """The loss of one micro-batch, summed over its response tokens: CE on the references (SFT,
    SeqKD), ATKD's per-token loss, a peer's divergence (jsd, tvd, skl, srkl) or alpha FKL +
    (1 - alpha) RKL (+ lm_weight CE)."""
    if out is None:
        return F.cross_entropy(logits[..., :run.vocab_size].flatten(0, 1).float(), batch["targets"].to(run.device).flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    if run.strategy[0] == "atkd":
        per_token = atkd_loss(out.tckd, out.nckd, atkd_easy(out.unc), args.atkd_lam)
    elif run.strategy[0] in DIVERGENCES:                  # a peer's divergence in place of the mixture
        per_token = out.div
    else:
        per_token = mix(out.fkl, out.rkl, out.akl_alpha if alpha is None else alpha)
    return per_token.sum() + args.lm_weight * out.ce.sum()


def clip_and_step(args, run, student, teacher, optimizer, teacher_optimizer):
    """Clips the gradient norm and steps (OKD: the LoRA too); a non-finite norm makes no update (T4).
    Returns the norm, the same on every rank: the gradients are synced."""
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)   # FSDP2: a DTensor
    if math.isfinite(grad_norm):
        optimizer.step()
        if teacher_optimizer is not None:
            step_lora(teacher, teacher_optimizer, args, run)
    optimizer.zero_grad(set_to_none=True)
    if teacher_optimizer is not None:
        teacher_optimizer.zero_grad(set_to_none=True)
    return grad_norm


def close_reward_window(args, run, student, policy, window):
    """ARKD: the reward r = (FKL - FKL') / FKL + (RKL - RKL') / RKL of the window's action on its batch after
    the update, to the policy (a REINFORCE update every M; a non-finite reward drops the action).
    Returns the log fields: the reward (None when dropped), the update's statistics when one ran."""
    after = stat_means(reward_stats(student, window, args, run))
    reward = immediate_reward(window.before["fkl"], window.before["rkl"], after["fkl"], after["rkl"])
    if not math.isfinite(reward):
        policy.drop_action()
        return {"reward": None}
    if policy.store_reward(reward):                             # M rewards stored:
        return {"reward": reward, **policy.update()}            # one REINFORCE step
    return {"reward": reward}


def kd_log(stats, alpha, policy, akl):
    """The KD part of a step's log row: alpha (AKL: its mean weight; ATKD: none), every statistic's token
    mean (ARKD's akl_alpha: its state's, where its head search runs), the policy's Beta."""
    means = stat_means(stats)
    if not akl:                             # the step's AKL weights were not all computed (kd_pass akl=False)
        del means["akl_alpha"]
    row = {"alpha": means["akl_alpha"] if akl else alpha, **{k: v for k, v in means.items() if k != "tokens"}}
    if policy is not None:
        row["beta_a"], row["beta_b"] = policy.last_beta
    return row


def okd_teacher_loss(logits, teacher_logits, targets, args, run):
    """OKD's loss for the teacher's LoRA, summed over the response tokens (method.md 8): a_t KL(q || p) +
    (1 - a_t) CE(p, reference), p the adapted teacher, q the student (detached); kd_pass with the roles
    swapped gives KL(q || p) as its "FKL" (closed-form gradient) and the teacher's CE."""
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
    teacher_logits = window.teacher_logits if run.cache is None else teacher_forward(None, window.batch, run, logits)
    # Summed over ranks: the reward, like the state, belongs to the whole micro-batch 0.
    return all_reduce_sum(kd_pass(logits, teacher_logits, targets != IGNORE_INDEX, args.tau, run.vocab_size,
                                  args.chunk_tokens, target_ids=targets, akl=False).stats)   # FKL' and RKL' only


# ----------------------------------------------------------------------------------------------
# A cached teacher (Choices 8.6-8.8): built once by --method cache, read by --teacher_cache

CACHE_FIELDS = ("top_logp", "top_ids", "target_logp", "tail_logp")        # losses.teacher_summary's, per position


def teacher_forward(teacher, batch, run, student_logits):
    """The teacher's logits on a batch: its forward, or from the cache around the student's (8.6)."""
    return forward(teacher, batch, run) if run.cache is None else run.cache.teacher_logits(batch, student_logits, run)


def cache_key(args, tokenizer):
    """What a cache depends on (8.8): teacher weights (when a folder here), tokenizer, data file, lengths."""
    def digest(paths):
        h = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
        return h.hexdigest()
    weights = sorted(glob.glob(os.path.join(args.teacher, "*.safetensors")) + glob.glob(os.path.join(args.teacher, "*.bin")))
    return {"teacher": digest(weights) if weights else None, "data": digest([data.dataset_file("dolly_train", args.data_dir)]),
            "tokenizer": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
            **{name: getattr(args, name) for name in ("max_prompt", "max_total", "train_examples")}}


@torch.no_grad()
def build_teacher_cache(args, run, teacher, examples, key, shard_examples=1024):
    """--method cache (8.6): losses.teacher_summary at every response position of the training examples, in
    safetensors shards of shard_examples examples (shard i by rank i mod W), each written whole: a shard
    on disk is kept, so a stopped build resumes. OUT/key.json says what the cache holds."""
    from safetensors.torch import save_file
    key, key_path = {**key, "k": args.cache_k}, os.path.join(args.out, "key.json")
    if os.path.exists(key_path) and read_cache_file(key_path) != key:
        raise ValueError(f"{key_path} belongs to another teacher, data, tokenizer, length or k: choose another --out")
    barrier()
    if run.master:
        write_atomic(key_path, json.dumps(key, indent=1))
    for shard, start in enumerate(range(0, len(examples), shard_examples)):
        path, chunk, parts = os.path.join(args.out, f"{shard:05d}.safetensors"), examples[start:start + shard_examples], []
        if shard % run.world_size != run.rank or os.path.exists(path):
            continue
        for i in range(0, len(chunk), args.batch_size):
            batch = data.collate_train(chunk[i:i + args.batch_size], run.pad_id)
            targets = next_token_targets(batch.pop("labels")).to(run.device)
            mask = targets != IGNORE_INDEX
            summary = teacher_summary(forward(teacher, batch, run)[mask], targets[mask], args.cache_k, run.vocab_size)
            parts.append([x.cpu() for x in summary] + [mask.sum(1).cpu()])
        tensors = dict(zip(CACHE_FIELDS + ("positions",), (torch.cat(column) for column in zip(*parts))))
        tensors.update(top_ids=tensors["top_ids"].int(), index=torch.tensor([e["index"] for e in chunk]))
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
    barrier()


def read_cache_file(path):
    """A cache's key.json or a shard's tensors; anything unreadable is a ValueError naming the file."""
    from safetensors.torch import load_file
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8")) if path.endswith(".json") else load_file(path)
    except Exception as err:             # missing, truncated, not JSON, not safetensors
        raise ValueError(f"teacher cache file {path} does not load ({type(err).__name__}: {str(err)[:200]})") from None


class TeacherCache:
    """A --method cache folder checked against this run's key (8.8), read whole into CPU memory."""

    def __init__(self, folder, key, examples):
        saved = read_cache_file(os.path.join(folder, "key.json"))
        differ = [name for name, value in key.items() if value is not None and saved.get(name) != value]
        if differ:
            raise ValueError(f"--teacher_cache {folder} was built for another {', '.join(differ)}: build it again")
        if key["teacher"] is None:
            print0(f"note: --teacher is not a folder here: the teacher of --teacher_cache {folder} is not checked")
        self.rows = {}
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
            shard = read_cache_file(os.path.join(folder, name))
            ends, counts = shard["positions"].cumsum(0).tolist(), shard["positions"].tolist()
            for index, end, count in zip(shard["index"].tolist(), ends, counts):
                self.rows[index] = [shard[field_name][end - count:end] for field_name in CACHE_FIELDS]
        missing = sum(e["index"] not in self.rows for e in examples)
        if missing:
            raise ValueError(f"--teacher_cache {folder} lacks {missing} of the {len(examples)} training examples: finish it")

    def tail_mass(self, batches):
        """The mean p_tail of these batches' response positions (Choice 8.7), from the cache alone."""
        tails = torch.cat([self.rows[i][3] for batch in batches for i in batch["index"].tolist()])
        return float(tails.exp().sum()) / max(len(tails), 1)

    def teacher_logits(self, batch, student_logits, run):
        targets = batch["targets"].to(run.device)
        mask = targets != IGNORE_INDEX
        top_logp, top_ids, target_logp, tail_logp = (torch.cat(column).to(run.device) for column in zip(
            *(self.rows[i] for i in batch["index"].tolist())))
        teacher = torch.zeros(*targets.shape, run.vocab_size, device=run.device)
        teacher[mask] = cached_teacher_logits(student_logits[mask], top_logp, top_ids.long(), targets[mask], target_logp,
                                              tail_logp, run.vocab_size)
        return teacher


# ----------------------------------------------------------------------------------------------
# Checkpoints (Choice T7): what one holds, and resuming from it (the files: plumbing.py)


@dataclass
class Progress:
    """What a checkpoint carries besides models, optimizers and random states (8.4, 8.5: SGO's share and buffer)."""
    step: int = 0
    best: float = -1.0
    bad_steps: int = 0
    skipped: int = 0
    sgo_share: float = 0.0
    dev_loss_ref: float = math.nan
    sgo_buffer: list = field(default_factory=list)       # (prompt ids, response ids) pairs of ints, oldest first


def save_checkpoint(args, run, student, tokenizer, optimizer, policy, progress, window, teacher=None, teacher_optimizer=None):
    """Every rank's random state (and its reward window's) is gathered, so any rank count resumes exactly."""
    # The window's micro-batch 0 goes too: with --sgo_ratio its responses came from weights now gone.
    mine = {"rng": rng_snapshot(run.device), "window_rng": window.rng if window is not None else None,
            "window_batch": None if window is None else {k: v.cpu() for k, v in window.batch.items()}}
    ranks = [mine]
    if run.world_size > 1:                  # rank 0 writes the file, so it needs every rank's state
        ranks = [None] * run.world_size
        dist.all_gather_object(ranks, mine)
    weights, optimizer_state = plumbing.full_state(student, optimizer)    # FSDP2: gathered on rank 0
    if run.master:
        okd = teacher_optimizer is not None          # OKD: the teacher's LoRA and its optimizer too
        state = {**vars(progress), "optimizer": optimizer_state, "ranks": ranks,
                 "policy": policy.state_dict() if policy is not None else None,
                 "lora": lora_state_dict(teacher) if okd else None,
                 "teacher_optimizer": teacher_optimizer.state_dict() if okd else None,
                 "window": None if window is None else {"step": window.step, "before": window.before}}
        write_atomic(os.path.join(args.out, "last"), functools.partial(
            plumbing.save_model, student=student, tokenizer=tokenizer, info={**vars(args), "world_size": run.world_size},
            training_state=state, weights=weights), keep_old=args.keep_checkpoints > 1)
    barrier()                               # no rank runs on while the checkpoint is being written


def resume(checkpoint, args, run, model, teacher, optimizer, policy, teacher_optimizer=None):
    """Progress and the open reward window of the checkpoint; restores optimizers, policy, LoRA, random states."""
    state = torch.load(os.path.join(checkpoint, "training_state.pt"), map_location="cpu", weights_only=True)
    plumbing.load_optimizer_state(optimizer, state["optimizer"], model)
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
    if state["window"] is not None:         # the window's batch as it was, and its teacher logits again
        batch0 = mine["window_batch"]
        with torch.no_grad():
            teacher_logits = forward(teacher, batch0, run) if run.cache is None else None
        window = RewardWindow(state["window"]["step"], state["window"]["before"], mine["window_rng"], batch0, teacher_logits)
    print0(f"resumed from {checkpoint} at step {state['step']}")
    return Progress(**{f.name: state[f.name] for f in fields(Progress)}), window


# ----------------------------------------------------------------------------------------------
# Training


def build_training(args, run, student, teacher):
    """(the student, DDP-wrapped or FSDP2-sharded on several processes; its optimizer; OKD's LoRA optimizer;
    ARKD's policy, else None)."""
    if run.world_size > 1 and args.shard == "fsdp":         # Choice T9: FSDP2, each block its own unit
        model = plumbing.shard(student)
    else:
        model = student if run.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    teacher_optimizer = torch.optim.AdamW(lora_parameters(teacher), lr=args.okd_lr or args.lr, weight_decay=0.0) \
        if args.method == "okd" else None                   # its own state: other parameters (Choice O4)
    policy = ARKDPolicy(buffer_size=args.policy_buffer, lr=args.policy_lr, entropy_coef=args.policy_entropy, seed=args.seed) \
        if args.method == "kd" and args.strategy == "arkd" else None
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
        weights, _ = plumbing.full_state(student)       # FSDP2: gathered on rank 0 (every rank takes part)
        if run.master:
            write_atomic(os.path.join(args.out, "best"), functools.partial(
                plumbing.save_model, student=student, tokenizer=tokenizer, info={"step": progress.step, "val_rougeL": score},
                weights=weights))
    return score


@torch.no_grad()
def dev_loss(student, val_examples, args, run):
    """The student's CE on the dev references, a token mean: DistiLLM's L (Choice 8.4). Every rank computes
    it whole (the same number everywhere; under FSDP2 the same forwards on every rank)."""
    student.eval()
    total, count = 0.0, 0
    for start in range(0, len(val_examples), args.batch_size):
        batch = data.collate_train(val_examples[start:start + args.batch_size], run.pad_id)
        batch["targets"] = next_token_targets(batch.pop("labels"))
        total += float(micro_batch_loss(args, run, forward(student, batch, run), batch, None, None))    # the CE sum
        count += int((batch["targets"] != IGNORE_INDEX).sum())
    student.train()
    return total / max(count, 1)


def adapt_sgo_share(progress, loss):
    """DistiLLM's rule (Choice 8.4): a dev loss 0.1 above the one of the last rise (at first, before
    training) raises the share by 0.1, at most to 1, and becomes the new reference. Returns the log row."""
    if loss >= progress.dev_loss_ref + 0.1:
        progress.sgo_share, progress.dev_loss_ref = min(round(progress.sgo_share + 0.1, 9), 1.0), loss
    return {"step": progress.step, "dev_loss": loss, "sgo_share": progress.sgo_share}


def count_bad_step(row, progress, args):
    """Choice T4: a non-finite gradient made no update; the error once --max_bad_steps come in a row."""
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
    expected = {**{k: getattr(args, k) for k in RUN_DEFINING}, "world_size": run.world_size}
    checkpoint = plumbing.checkpoint_to_resume(args.out, args.resume, args.resume_previous, expected)
    torch.manual_seed(args.seed + run.rank)
    tokenizer, student, teacher = load_models(args, run, checkpoint)
    train_dir = args.data_dir
    if args.method == "seqkd":                          # SeqKD trains on the teacher's samples (T5)
        train_dir = args.seqkd_data or os.path.join(args.out, "seqkd_data")
        build_seqkd_data(teacher, tokenizer, args, train_dir)
        teacher = None                                  # the steps hold no teacher
    examples, val_examples, val_records = load_training_data(args, run, tokenizer, train_dir)
    if args.method == "cache":                          # the teacher once over the training data (8.6)
        build_teacher_cache(args, run, teacher, examples, cache_key(args, tokenizer))
        print0(f"cache: {args.out} holds the teacher's top {args.cache_k} for {len(examples)} training examples")
        finish(args, run, None, None)
        return {"cache": args.out}
    if args.teacher_cache:
        run.cache = TeacherCache(args.teacher_cache, cache_key(args, tokenizer), examples)
    model, optimizer, teacher_optimizer, policy = build_training(args, run, student, teacher)
    progress, window = Progress(sgo_share=args.sgo_init if args.sgo_adaptive else args.sgo_ratio), None
    if checkpoint:
        progress, window = resume(checkpoint, args, run, model, teacher, optimizer, policy, teacher_optimizer)
    elif args.sgo_adaptive:                             # the reference loss, before training (Choice 8.4)
        progress.dev_loss_ref = dev_loss(student, val_examples, args, run)
    metrics = plumbing.MetricsLog(os.path.join(args.out, "metrics.jsonl"), progress.step if checkpoint else None, run.master,
                                  os.path.join(args.out, "tensorboard") if args.report_to == "tensorboard" else None)
    line = plumbing.ProgressLine(run, f"kd {args.strategy}" if args.method == "kd" else args.method)
    first_step, history = progress.step, []
    while progress.step < run.total_steps:
        started = time.perf_counter()
        set_lr(progress.step, args, run, optimizer, teacher_optimizer)
        batches = micro_batches(examples, progress.step, args, run, student, tokenizer, progress)
        row, window = train_step(args, run, model, teacher, optimizer, policy, batches, progress.step, window,
                                 teacher_optimizer)
        stop, seconds = count_bad_step(row, progress, args), time.perf_counter() - started
        row.update(lr=optimizer.param_groups[0]["lr"], skipped_steps=progress.skipped, step_seconds=seconds,
                   tokens_per_second=row.pop("step_tokens") / seconds)
        if args.sgo_adaptive or args.sgo_buffer:
            row.update(sgo_share=progress.sgo_share, sgo_buffer=len(progress.sgo_buffer))
        if run.cache is not None:                       # rank 0's positions this step (Choice 8.7)
            row["teacher_tail_mass"] = run.cache.tail_mass(batches)
        history.append(row)
        metrics.write(row)
        if stop:
            metrics.flush()
            raise RuntimeError(stop)
        line.update(row)
        progress.step += 1
        if args.sgo_adaptive and progress.step % run.steps_per_epoch == 0 and progress.step < run.total_steps:
            metrics.write(adapt_sgo_share(progress, dev_loss(student, val_examples, args, run)))
        scheduled = progress.step == run.total_steps or (args.eval_every and progress.step % args.eval_every == 0)
        stopping = bool(args.stop_after) and progress.step - first_step >= args.stop_after
        if scheduled:
            row["val_rougeL"] = validate(args, run, student, tokenizer, val_examples, val_records, progress, metrics)
        if scheduled or stopping:
            metrics.flush()                             # the log never lags its checkpoint
            save_checkpoint(args, run, student, tokenizer, optimizer, policy, progress, window, teacher, teacher_optimizer)
        if stopping:
            print0(f"stopping after step {progress.step} as asked (--stop_after): continue with --resume")
            break
    finish(args, run, metrics, progress)
    return {"student": student, "teacher": teacher, "policy": policy, "history": history, "best": progress.best,
            "run": run}


def set_lr(step, args, run, optimizer, teacher_optimizer):
    """The learning rate is a pure function of the step (Choice T6), for the student and OKD's LoRA."""
    for opt, peak in ((optimizer, args.lr), (teacher_optimizer, args.okd_lr or args.lr)):
        for group in opt.param_groups if opt else ():
            group["lr"] = peak * cosine_lr(step, run.total_steps, run.warmup_steps)


def finish(args, run, metrics, progress):
    """Closes the log, draws the KD plots (rank 0) and leaves the process group."""
    if run.master and metrics is not None:
        metrics.close()
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
        main()
    except (ValueError, OSError) as err:    # bad settings or files: the message, not a traceback
        sys.exit(f"arkd.py: {err}")
