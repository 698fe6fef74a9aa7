"""ARKD training: SFT, SeqKD and KD with every alpha strategy (ARKD included), on one GPU or many.

Implements ../shared/ARKD_SPEC.md sections 1 to 3 and 6 on top of losses.py, policy.py, data.py and
evaluate.py. Every strategy is trained by the same loop, so the comparison is fair.

    python arkd.py --method kd --strategy arkd --teacher T --student S --data_dir D --out RUN
    torchrun --nproc_per_node=8 arkd.py ...          # DDP: nccl on CUDA, gloo on CPU
    python arkd.py --method kd --strategy arkd ... --out RUN --resume
    python arkd.py plot RUN                           # figures 5 and 6 of the paper as PNG

Our choices where the paper is vague (each is marked "Choice N" where it is made):
1. The objective is the sum over the step's response tokens of alpha FKL + (1 - alpha) RKL
   (+ lm_weight CE), divided by the response-token count of the whole step, all micro-batches and
   all ranks (all-reduced before the first backward). DDP averages gradients over ranks, so each
   rank scales its loss by the world size: accumulation and GPU count do not change the gradient.
2. Alpha must be known before the first backward of a step, so the policy's state (and greedy's
   ratio) come from micro-batch 0's statistics summed over ranks, the micro-batch the reward is
   measured on; the whole step's statistics are what gets logged.
3. The reward forward reruns micro-batch 0 after the optimizer step with the random state of its
   training forward: the same dropout masks, so FKL' and RKL' differ from FKL and RKL only by the
   update. With --reward_every n the action holds for n steps and the window's first batch is rerun
   at its end.
4. A step whose gradient norm is not finite is skipped (no update) and counted; ten in a row abort.
5. SeqKD: the teacher samples responses for the training prompts with the evaluation settings
   (spec section 5, seed --seed), written in the MiniLLM layout, part by part, so it resumes.
6. Warmup is --warmup_ratio of the steps (default 5%), then cosine decay to 0.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import evaluate
from losses import IGNORE_INDEX, STAT_NAMES, Strategy, kd_pass, mix, next_token_targets, stat_means
from policy import ARKDPolicy, all_reduce_sum, immediate_reward, make_state

MAX_BAD_STEPS = 10
# Settings that define a run: a checkpoint resumes only under the same values.
RUN_DEFINING = ("method", "strategy", "teacher", "student", "data_dir", "tau", "lm_weight", "lr",
                "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum", "world_size",
                "seed", "reward_every", "policy_buffer", "policy_lr", "policy_entropy", "seqkd_data",
                "train_examples")


# ----------------------------------------------------------------------------------------------
# Settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ARKD / KD / SFT training (see the module docstring).")
    # what to train
    p.add_argument("--method", default="kd", choices=("sft", "seqkd", "kd"), help="sft: CE on references; "
                   "seqkd: CE on teacher samples; kd: alpha FKL + (1 - alpha) RKL")
    p.add_argument("--strategy", default="arkd", help="kd only: fkl, rkl, fixed:A, linear:A0,A1, greedy, akl, arkd")
    p.add_argument("--teacher", default="MiniLLM/teacher-gpt2-1.5B", help="teacher model (kd, seqkd)")
    p.add_argument("--student", default="MiniLLM/init-gpt2-120M", help="student initialisation")
    p.add_argument("--data_dir", default=None, help="MiniLLM Hub layout on disk; default: the Hub")
    p.add_argument("--seqkd_data", default=None, help="seqkd: where teacher samples go (default OUT/seqkd_data)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, plots")
    # objective
    p.add_argument("--tau", type=float, default=1.0, help="temperature; the KD loss is scaled by tau^2")
    p.add_argument("--lm_weight", type=float, default=0.0, help="weight of the reference CE added to KD")
    p.add_argument("--chunk_tokens", type=int, default=None, help="kd_pass chunk (default: by device)")
    # optimisation
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (spec: 5e-4 for 120M, 1e-4 larger)")
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
    p.add_argument("--policy_buffer", type=int, default=16, help="actions per REINFORCE update (M)")
    p.add_argument("--policy_lr", type=float, default=3e-4, help="policy Adam learning rate")
    p.add_argument("--policy_entropy", type=float, default=0.01, help="entropy bonus c_H")
    # validation, checkpoints, logging
    p.add_argument("--eval_every", type=int, default=200, help="validate and checkpoint every N steps (0: at the end)")
    p.add_argument("--val_examples", type=int, default=500, help="dev prompts used for validation Rouge-L")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens sampled per prompt (validation, SeqKD)")
    p.add_argument("--gen_batch_size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--train_examples", type=int, default=0, help="use the first N training records (0: all)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--stop_after", type=int, default=0, help="leave after N steps of this run, "
                   "checkpointed, e.g. for a job time limit (0: run to the end)")
    args = p.parse_args(argv)
    Strategy.parse(args.strategy)                      # unknown names fail here, before any work
    for name in ("lr", "batch_size", "epochs", "reward_every", "policy_buffer", "val_examples"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0")
    if args.tau <= 0 or args.lm_weight < 0 or not 0 <= args.warmup_ratio < 1:
        p.error("--tau must be > 0, --lm_weight >= 0, --warmup_ratio in [0, 1)")
    if args.method != "kd":
        args.strategy = "none"
    args.seqkd_data = args.seqkd_data or (os.path.join(args.out, "seqkd_data") if args.method == "seqkd" else None)
    return args


def check_paths(args):
    """Missing model directories and data fail in seconds, before any model is loaded."""
    models = [args.student] + ([args.teacher] if args.method != "sft" else [])
    for path in models:
        evaluate.check_model_path(path)
    if args.data_dir is not None:
        data.dataset_file("dolly_train", args.data_dir)


# ----------------------------------------------------------------------------------------------
# Processes (nanoGPT pattern): the same script under `python` and under torchrun


def setup_distributed():
    """(rank, world size, device); initialises torch.distributed when torchrun set RANK."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Models and data


def load_tokenizer_pair(args):
    """The student's tokenizer; refuses a teacher whose tokenizer differs (spec section 1)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if args.method != "sft":
        teacher_tok = AutoTokenizer.from_pretrained(args.teacher)
        if teacher_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {args.teacher} ({len(teacher_tok)} tokens) and student {args.student} "
                             f"({len(tokenizer)} tokens) use different tokenizers: distillation needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, device, dtype, vocab_size):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    width = model.get_output_embeddings().weight.shape[0]
    if width < vocab_size:
        raise ValueError(f"model {path}: {width} output columns, fewer than the {vocab_size} tokens of the tokenizer")
    return model


def micro_batches(examples, step, args, rank, world_size):
    """The micro-batches of optimizer step `step` on this rank (a pure function of the step).

    Every epoch has its own seeded order; rank r takes every world_size-th example of it, so
    1 process x accumulation 4 and 2 processes x accumulation 2 see the same examples in a step.
    """
    per_step = args.batch_size * args.grad_accum
    steps_per_epoch = len(examples) // (per_step * world_size)
    epoch, within = divmod(step, steps_per_epoch)
    mine = data.epoch_order(len(examples), args.seed, epoch)[rank::world_size]
    chosen = mine[within * per_step:(within + 1) * per_step]
    batches = []
    for i in range(args.grad_accum):
        batch = data.collate_train([examples[j] for j in chosen[i * args.batch_size:(i + 1) * args.batch_size]], args.pad_id)
        batch["targets"] = next_token_targets(batch.pop("labels"))
        batches.append(batch)
    return batches


def cosine_lr(step, total_steps, warmup_steps):
    """Linear warmup to 1, then cosine decay to 0 (Choice 6); a multiplier of --lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------------------------
# One optimizer step


def forward(model, batch, device, autocast):
    with autocast:
        return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     use_cache=False).logits


def forward_backward(model, teacher, batches, args, choose_alpha, world_size):
    """Accumulates the gradient of the step's objective (Choice 1) over the micro-batches.

    choose_alpha(stats0, batch0, teacher_logits0) is called once, after micro-batch 0's forward and
    before its backward (Choice 2). Returns (alpha, the step's summed statistics, loss).
    """
    device = next(model.parameters()).device
    local = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
    # The denominator is the step's token count over all ranks, known before any backward.
    n_global = float(all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64, device=device)))
    step_stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)
    alpha, total = None, 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # Under DDP, gradients are synchronised on the last micro-batch only; no_sync must wrap
        # the forward too, or DDP prepares a reduction anyway.
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            logits = forward(model, batch, device, args.autocast)                # (B, T, V')
            targets = batch["targets"].to(device)
            mask = targets != IGNORE_INDEX
            if args.method == "kd":
                with torch.no_grad():
                    teacher_logits = forward(teacher, batch, device, args.autocast)
                out = kd_pass(logits, teacher_logits, mask, args.tau, args.vocab_size, args.chunk_tokens,
                              target_ids=targets, inplace_grad=True)
                if i == 0:     # every rank needs the same state: sum micro-batch 0 over ranks
                    alpha = choose_alpha(all_reduce_sum(out.stats), batch, teacher_logits)
                weight = out.akl_share if args.strategy == "akl" else alpha
                loss = mix(out.fkl, out.rkl, weight).sum() + args.lm_weight * out.ce.sum()
                step_stats += out.stats
            else:
                loss = F.cross_entropy(logits[..., :args.vocab_size].flatten(0, 1).float(),
                                       targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            (loss * world_size / max(n_global, 1.0)).backward()
            total += float(loss.detach())
    total /= max(n_global, 1.0)
    return alpha, all_reduce_sum(step_stats), float(all_reduce_sum(torch.tensor([total], device=device)))


@torch.no_grad()
def reward_stats(model, batch, teacher_logits, rng_state, args):
    """FKL / RKL sums of the rerun of micro-batch 0 with its training dropout masks (Choice 3)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(rng_state["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng_state["cuda"], device)
        logits = forward(model, batch, device, args.autocast)
    targets = batch["targets"].to(device)
    return all_reduce_sum(kd_pass(logits, teacher_logits, targets != IGNORE_INDEX, args.tau, args.vocab_size,
                                  args.chunk_tokens, target_ids=targets).stats)


def rng_snapshot(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary directory, renamed into place when complete


def save_atomic(path, write):
    """write(tmp_dir) fills a fresh directory; it replaces `path` only once complete.

    A crash at any point leaves either the old `path` or, between the two renames, `path`.old:
    find_checkpoint looks at both, so the last good checkpoint always survives.
    """
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out):
    for candidate in (os.path.join(out, "last"), os.path.join(out, "last.old")):
        if os.path.isfile(os.path.join(candidate, "training_state.pt")):
            return candidate
    return None


def save_model(directory, student, tokenizer, info):
    """Plain Hugging Face weights (safetensors) that AutoModelForCausalLM loads, plus info.json."""
    student.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "info.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)


def save_checkpoint(out, student, tokenizer, state, args):
    def write(tmp):
        save_model(tmp, student, tokenizer, settings(args))
        torch.save(state, os.path.join(tmp, "training_state.pt"))
    save_atomic(os.path.join(out, "last"), write)


def settings(args):
    """The run's flags as saved next to every checkpoint (the autocast context is not a setting)."""
    return {k: v for k, v in vars(args).items() if k != "autocast"}


def check_resumable(checkpoint, args):
    with open(os.path.join(checkpoint, "info.json")) as f:
        saved = json.load(f)
    differ = [k for k in RUN_DEFINING if saved.get(k) != getattr(args, k)]
    if differ:
        raise ValueError(f"--resume: {checkpoint} was written with other settings: "
                         + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(args, k)!r})" for k in differ))


# ----------------------------------------------------------------------------------------------
# SeqKD data: teacher samples for the training prompts, in the MiniLLM layout, resumable


def build_seqkd_data(teacher, tokenizer, args, part_size=256):
    """Writes SEQKD/dolly/raw.jsonl: the dev lines as they are, then the training prompts with the
    teacher's sampled responses (Choice 5). Each part of part_size prompts is its own file."""
    target = os.path.join(args.seqkd_data, "dolly", "raw.jsonl")
    if os.path.exists(target):
        return
    parts_dir = os.path.join(args.seqkd_data, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    train = data.load_records("dolly_train", args.data_dir)[:args.train_examples or None]
    examples, _ = data.encode_records(tokenizer, train, "seqkd prompts")
    rank = evaluate.world()[0]
    for start in range(0, len(examples), part_size):
        part = os.path.join(parts_dir, f"{start:07d}.jsonl")
        if os.path.exists(part):
            continue
        chunk = examples[start:start + part_size]
        samples = evaluate.generate(teacher, tokenizer, [e["prompt_ids"] for e in chunk],
                                    args.seed * 7919 + start, args.gen_batch_size, args.max_new_tokens)
        if rank == 0:
            lines = [json.dumps({"instruction": train[e["index"]]["instruction"], "input": train[e["index"]]["input"],
                                 "output": s}) for e, s in zip(chunk, samples) if s.strip()]
            evaluate.write_atomic(part, "\n".join(lines) + "\n")
        evaluate.barrier()
    if rank == 0:
        dev = data.load_records("dolly_dev", args.data_dir)
        lines = [json.dumps({"instruction": r["instruction"], "input": r["input"], "output": r["references"][0]}) for r in dev]
        for name in sorted(os.listdir(parts_dir)):
            with open(os.path.join(parts_dir, name), encoding="utf-8") as f:
                lines += [line.rstrip("\n") for line in f if line.strip()]
        evaluate.write_atomic(target, "\n".join(lines) + "\n")
    evaluate.barrier()


# ----------------------------------------------------------------------------------------------
# Plots: the paper's figures 5 (alpha) and 6 (reward with FKL and RKL)


def plot(run_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"plot: {path} does not exist")
    rows = [r for r in map(json.loads, filter(str.strip, open(path))) if "alpha" in r]   # training steps
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["alpha"] for r in rows], lw=0.8, label="alpha (FKL weight)")
    if any(r.get("beta_a") for r in rows):
        ax.plot(steps, [r["beta_a"] / (r["beta_a"] + r["beta_b"]) if r.get("beta_a") else None for r in rows],
                lw=1.5, label="policy mean a / (a + b)")
    ax.set(xlabel="step", ylabel="alpha", ylim=(0, 1), title="alpha trajectory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "alpha.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["fkl"] for r in rows], label="FKL")
    ax.plot(steps, [r["rkl"] for r in rows], label="RKL")
    ax.set(xlabel="step", ylabel="divergence", title="reward, FKL and RKL")
    rewarded = [(r["step"], r["reward"]) for r in rows if r.get("reward") is not None]
    if rewarded:
        twin = ax.twinx()
        twin.plot(*zip(*rewarded), color="tab:green", lw=0.8, label="reward")
        twin.set_ylabel("reward")
        twin.legend(loc="upper center")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "reward.png"), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Training


def validate(model, tokenizer, val_examples, val_records, args):
    """Mean Rouge-L of sampled responses to the dev prompts (the same on every rank)."""
    model.eval()
    predictions = evaluate.generate(model, tokenizer, [e["prompt_ids"] for e in val_examples], args.seed,
                                    args.gen_batch_size, args.max_new_tokens, progress=False)
    model.train()
    return sum(evaluate.rouge_l(p, val_records[e["index"]]["references"])
               for p, e in zip(predictions, val_examples)) / len(val_examples)


def main(argv=None):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()      # one bar per run is enough: ours
    args = parse_args(argv)
    check_paths(args)
    rank, world_size, device = setup_distributed()
    master = rank == 0                                    # logs, checkpoints, plots
    print0 = evaluate.print0
    args.world_size = world_size
    if args.grad_accum == 0:
        if 32 % (args.batch_size * world_size):
            raise ValueError(f"global batch 32 is not a multiple of --batch_size {args.batch_size} x "
                             f"{world_size} processes: set --grad_accum")
        args.grad_accum = 32 // (args.batch_size * world_size)
    checkpoint = find_checkpoint(args.out)
    if args.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {args.out}")
    if not args.resume and checkpoint is not None:
        raise FileExistsError(f"{args.out} already holds a checkpoint: pass --resume or choose another --out")
    if args.resume:
        check_resumable(checkpoint, args)

    bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and device.type == "cuda")
    args.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    torch.manual_seed(args.seed + rank)
    tokenizer = load_tokenizer_pair(args)
    args.vocab_size, args.pad_id = len(tokenizer), tokenizer.pad_token_id
    teacher = None
    if args.method != "sft":
        teacher = load_model(args.teacher, device, torch.bfloat16 if bf16 else torch.float32, args.vocab_size).eval()
        teacher.requires_grad_(False)
    if args.method == "seqkd":
        build_seqkd_data(teacher, tokenizer, args)
        teacher = None
    student = load_model(checkpoint if args.resume else args.student, device, torch.float32, args.vocab_size)
    student.train()

    train_dir = args.seqkd_data if args.method == "seqkd" else args.data_dir
    records = data.load_records("dolly_train", train_dir)[:args.train_examples or None]
    examples, _ = data.encode_records(tokenizer, records, "dolly_train")
    val_records = data.load_records("dolly_dev", args.data_dir)[:args.val_examples]
    val_examples, _ = data.encode_records(tokenizer, val_records, "dolly_dev")
    steps_per_epoch = len(examples) // (args.batch_size * args.grad_accum * world_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} training examples are fewer than one global batch")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = int(args.warmup_ratio * total_steps)

    model = student
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    strategy = Strategy.parse(args.strategy) if args.method == "kd" else None
    policy = ARKDPolicy(buffer_size=args.policy_buffer, lr=args.policy_lr, entropy_coef=args.policy_entropy,
                        seed=args.seed) if args.strategy == "arkd" else None
    step, best, bad_steps, skipped, window = 0, -1.0, 0, 0, None
    if args.resume:
        state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        if policy is not None:
            policy.load_state_dict(state["policy"])
        step, best, bad_steps, skipped, window = state["step"], state["best"], state["bad_steps"], state["skipped"], state["window"]
        torch.set_rng_state(state["rng"][rank]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
        if window is not None:   # the open reward window's batch and teacher logits, recomputed
            batch0 = micro_batches(examples, window["step"], args, rank, world_size)[0]
            with torch.no_grad():
                window["teacher_logits"] = forward(teacher, batch0, device, args.autocast)
            window["batch"] = batch0
        print0(f"resumed from {checkpoint} at step {step}")
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if master and args.resume and os.path.exists(metrics_path):   # drop what came after the checkpoint
        kept = [line for line in open(metrics_path) if line.strip() and json.loads(line)["step"] < step
                or '"val_rougeL"' in line and json.loads(line)["step"] <= step]
        evaluate.write_atomic(metrics_path, "".join(kept))
    metrics = open(metrics_path, "a") if master else None
    if master and not args.resume:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(settings(args), f, indent=1, default=str)
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc=f"{args.method} {args.strategy}",
               mininterval=0.1 if sys.stderr.isatty() else 30)      # a log file gets a line every 30 s
    first_step, history = step, []

    while step < total_steps:
        started = time.perf_counter()
        batches = micro_batches(examples, step, args, rank, world_size)
        lr = args.lr * cosine_lr(step, total_steps, warmup)            # a pure function of the step
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng0 = rng_snapshot(device)                        # micro-batch 0's dropout masks (Choice 3)
        row = {"step": step}

        def choose_alpha(stats0, batch0, teacher_logits0):
            """The ARKD step's decision: state -> alpha (other strategies: their rule)."""
            nonlocal window
            if args.strategy == "akl":
                return None                                # per-token weights, from each micro-batch
            if policy is None:
                return strategy.alpha(step, total_steps, stats=stats0)
            if window is None and torch.isfinite(stats0).all():   # a new action, held --reward_every steps
                means = stat_means(stats0)
                state = make_state(means, step / total_steps, policy.last_alpha, policy.last_reward)
                row.update(zip(("state_" + n for n in ("log_fkl", "log_rkl")), state[:2].tolist()))
                policy.act(state)
                window = {"step": step, "before": means, "rng": rng0, "batch": batch0, "teacher_logits": teacher_logits0}
            return policy.last_alpha

        alpha, stats, loss = forward_backward(model, teacher, batches, args, choose_alpha, world_size)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip))
        if math.isfinite(grad_norm):                         # the same norm on every rank: grads are synced
            optimizer.step()
            bad_steps = 0
        else:                                                # Choice 4
            bad_steps, skipped = bad_steps + 1, skipped + 1
            if bad_steps >= MAX_BAD_STEPS:
                raise RuntimeError(f"step {step}: {MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient")
        optimizer.zero_grad(set_to_none=True)

        if policy is not None and window is not None and (step + 1 - window["step"] >= args.reward_every or step + 1 == total_steps):
            after = stat_means(reward_stats(student, window["batch"], window["teacher_logits"], window["rng"], args))
            reward = immediate_reward(window["before"]["fkl"], window["before"]["rkl"], after["fkl"], after["rkl"])
            row["reward"] = reward
            row.update(policy.reward(reward) or {})
            window = None

        step += 1
        if args.method == "kd":
            means = stat_means(stats)
            row.update(alpha=means["akl_head_share"] if alpha is None else alpha,   # akl: mean weight
                       **{k: v for k, v in means.items() if k != "tokens"})
            if policy is not None:
                row["beta_a"], row["beta_b"] = policy.last_beta
        tokens = float(all_reduce_sum(torch.tensor([float(sum(int(b["attention_mask"].sum()) for b in batches))])))
        seconds = time.perf_counter() - started
        row.update(loss=loss, lr=lr, grad_norm=grad_norm, skipped_steps=skipped, step_seconds=seconds,
                   tokens_per_second=tokens / seconds)
        history.append(row)
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", **({"alpha": f"{row['alpha']:.3f}"} if "alpha" in row else {}))

        scheduled = step == total_steps or (args.eval_every and step % args.eval_every == 0)
        stopping = bool(args.stop_after) and step - first_step >= args.stop_after
        if scheduled:
            score = validate(student, tokenizer, val_examples, val_records, args)
            row["val_rougeL"] = score
            if master:
                print0(f"step {step}: validation Rouge-L {score:.2f}")
                metrics.write(json.dumps({"step": step, "val_rougeL": score}) + "\n")
            if score > best:
                best = score
                if master:
                    save_atomic(os.path.join(args.out, "best"), lambda tmp: save_model(tmp, student, tokenizer,
                                                                                      {"step": step, "val_rougeL": score}))
        if scheduled or stopping:
            rngs = [None] * world_size     # every rank's random state, for an exact resume
            snapshot = rng_snapshot(device)
            if world_size > 1:
                dist.all_gather_object(rngs, {k: v.cpu() if v is not None else None for k, v in snapshot.items()})
            else:
                rngs = [snapshot]
            if master:
                saved_window = None if window is None else {k: window[k] for k in ("step", "before", "rng")}
                save_checkpoint(args.out, student, tokenizer, {
                    "step": step, "optimizer": optimizer.state_dict(),
                    "policy": policy.state_dict() if policy is not None else None, "rng": rngs,
                    "best": best, "bad_steps": bad_steps, "skipped": skipped, "window": saved_window}, args)
            evaluate.barrier()
        if stopping:
            print0(f"stopping after step {step} as asked (--stop_after): continue with --resume")
            break
    bar.close()
    if master:
        metrics.close()
        if args.method == "kd":
            plot(args.out)
        print0(f"done: step {step} of {total_steps}, best validation Rouge-L {best:.2f}, {skipped} skipped steps")
    if world_size > 1:
        dist.destroy_process_group()
    return {"student": student, "policy": policy, "history": history, "best": best}


def tiny_model(tokenizer_dir, out, n_embd=64, n_layer=2, n_head=2, seed=0):
    """A randomly initialised GPT-2 of the given size, saved with the tokenizer, for offline runs."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["plot"]:
        plot(sys.argv[2])
    elif sys.argv[1:2] == ["tiny"]:
        tiny = argparse.ArgumentParser(description="Build a random tiny GPT-2 for offline runs.")
        tiny.add_argument("--tokenizer", required=True, help="tokenizer directory")
        tiny.add_argument("--out", required=True, help="model directory to write")
        for name, default in (("n_embd", 64), ("n_layer", 2), ("n_head", 2), ("seed", 0)):
            tiny.add_argument(f"--{name}", type=int, default=default, help=f"GPT2Config {name}")
        t = tiny.parse_args(sys.argv[2:])
        tiny_model(t.tokenizer, t.out, t.n_embd, t.n_layer, t.n_head, t.seed)
    else:
        main()
