"""Plumbing the training and evaluation scripts run on, none of it the method: processes (the nanoGPT
pattern: the same code under `python` and torchrun), atomic files, models (loading, saving, FSDP2, tiny
offline ones), checkpoint files (Choice T7; what one holds is arkd.py's save_checkpoint), logs.

    python plumbing.py tiny --tokenizer DIR --out MODEL [--n_embd 64 --n_layer 2 --n_head 2]
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------
# Processes (nanoGPT pattern): the same code runs under `python` and under torchrun


def world():
    """(rank, world size): (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_processes():
    """(rank, world size, device); joins torch.distributed when torchrun set RANK (nccl on CUDA, gloo on CPU)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def barrier():
    if world()[1] > 1:
        dist.barrier()


def print0(*args):
    if world()[0] == 0:
        print(*args, flush=True)


def write_atomic(path, content, keep_old=False):
    """Replaces `path` once its new content is complete: a string (a file's text) or write(tmp) filling the
    directory tmp, then two renames (path -> path.old, tmp -> path; find_checkpoint reads path.old after a
    crash between them). keep_old keeps path.old (the last checkpoint)."""
    tmp, old = path + ".tmp", path + ".old"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if isinstance(content, str):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    content(tmp)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if not keep_old:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Models: loading, shapes, saving; tiny random ones for offline runs


def check_model_path(path):
    """A path-like model name (absolute, ./..., an existing file) must be a directory; the rest are Hub ids."""
    if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".") or os.path.exists(path)):
        raise FileNotFoundError(f"model {path!r}: no such directory")


def load_tokenizer(path):
    """The tokenizer of a local model directory or Hub id, with pad = EOS when it has no pad token."""
    from transformers import AutoTokenizer
    check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(f"model {path!r}: no tokenizer in a local directory or on the Hub ({err})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, device, dtype=torch.float32, vocab_size=None):
    """A causal LM from a local directory or a Hub id; a clear error before any work. A model with fewer
    output columns than vocab_size (the tokenizer's) is refused; more is fine: kd_pass cuts the padding."""
    from transformers import AutoModelForCausalLM
    check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"model {path!r}: not a local model directory and not loadable from "
                                f"the Hugging Face Hub ({err})") from None
    width = model.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and width < vocab_size:
        raise ValueError(f"model {path}: {width} output columns, fewer than the {vocab_size} tokens of the tokenizer")
    return model.to(device)


def train_tokenizer(texts, vocab_size=700):
    """A byte-level BPE (GPT-2 style, EOS = pad = <|endoftext|>) trained on `texts`, for tiny offline
    models; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def tiny_model(tokenizer_dir, out, n_embd=64, n_layer=2, n_head=2, seed=0, dropout=0.1):
    """A randomly initialised GPT-2 of the given size, saved with the tokenizer, for offline runs."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def blocks_of(model):
    """(name, ModuleList) of a causal LM's transformer blocks (GPT-2's h, LLaMA's layers)."""
    total = model.config.num_hidden_layers
    return next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == total)


def shard(model):
    """PyTorch FSDP2 in place: each transformer block its own unit, then the rest (embeddings, final
    norm, head), so one block's full weights exist at a time. The optimizer is made after this."""
    from torch.distributed.fsdp import fully_shard
    for block in blocks_of(model)[1]:
        fully_shard(block)
    return fully_shard(model)


def full_state(model, optimizer=None):
    """(weights, optimizer state) to save: under FSDP2 gathered into full CPU tensors on rank 0 (a
    collective: every rank calls it; other ranks get empty dicts) and the optimizer's keyed by
    parameter name; otherwise (None: the model's own, the optimizer's state_dict())."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        return None, optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = {}                                      # a tied weight (GPT-2's head) is saved once, as unsharded
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    tied = {name for group in names.values() for name in group[1:]}
    weights = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in tied}
    return weights, get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None


def load_optimizer_state(optimizer, state, model=None):
    """The optimizer state of full_state back into an optimizer (under FSDP2 each rank takes its shards)."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------
# Checkpoints (Choice T7): OUT/last, written atomically; the one before it kept as OUT/last.old


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file and what is wrong."""


def find_checkpoint(out):
    """OUT/last, or OUT/last.old when a crash came between the two renames of a save."""
    for candidate in (os.path.join(out, "last"), os.path.join(out, "last.old")):
        if os.path.isdir(candidate):
            return candidate
    return None


def save_model(directory, student, tokenizer, info, training_state=None, weights=None):
    """Plain Hugging Face weights (safetensors), info.json, and for a checkpoint training_state.pt (plain tensors
    and numbers). weights: the full state dict of a sharded student (full_state), else the student's own."""
    student.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if training_state is not None:
        torch.save(training_state, os.path.join(directory, "training_state.pt"))


def checkpoint_to_resume(out, resume, resume_previous, expected):
    """The checkpoint directory to resume from (None for a fresh run), after checking that it loads."""
    checkpoint = find_checkpoint(out)
    if resume_previous:
        checkpoint = os.path.join(out, "last.old")
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--resume_previous: {checkpoint} does not exist")
    elif not resume:
        if checkpoint is not None:
            raise FileExistsError(f"{out} already holds a checkpoint: pass --resume or choose another --out")
        return None
    elif checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    problem = checkpoint_problem(checkpoint, expected)
    if problem:
        previous = os.path.join(out, "last.old")
        usable = not resume_previous and checkpoint != previous and os.path.isdir(previous) \
            and not checkpoint_problem(previous, expected)
        raise CheckpointError(f"cannot resume: {problem}" + (
            f". The checkpoint before it, {previous}, loads: pass --resume_previous to continue from it "
            "(the steps since it are trained again)" if usable else ""))
    return checkpoint


def checkpoint_problem(checkpoint, expected):
    """None when `checkpoint` can be resumed by a run whose defining settings (flags and world size)
    are `expected`, else what is wrong, naming the file."""
    info_path = os.path.join(checkpoint, "info.json")
    try:
        with open(info_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        return f"{info_path} does not load ({err})"
    differ = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in expected.items() if saved.get(k) != v]
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


# ----------------------------------------------------------------------------------------------
# Logs: metrics.jsonl on rank 0, strict JSON, never ahead of the checkpoint it resumes from


class MetricsLog:
    """One JSON row per step plus validation rows. Non-finite numbers are written as null (and
    counted); on resume the rows after the checkpoint, and a torn last line, are dropped. board: a
    folder that also receives every number as a TensorBoard scalar (the file stays the record)."""

    def __init__(self, path, resume_step, master, board=None):
        self.path, self.file, self.nonfinite_rows, self.board = path, None, 0, None
        if not master:
            return
        if board:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(board)
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
        for name, value in clean.items() if self.board else ():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                self.board.add_scalar(name, value, clean["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()

    def flush(self):
        """Rows written so far reach the disk: called before a checkpoint is declared done."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
        if self.board is not None:
            self.board.flush()


class ProgressLine:
    """A line on rank 0 every 10 seconds and at the last step: the step, loss, alpha and speed."""

    def __init__(self, run, label):
        self.run, self.label, self.last_print = run, label, 0.0

    def update(self, row):
        if self.run.master and (time.time() - self.last_print >= 10 or row["step"] + 1 == self.run.total_steps):
            self.last_print = time.time()
            alpha = f" alpha {row['alpha']:.3f}" if row.get("alpha") is not None else ""
            print(f"{self.label} step {row['step'] + 1}/{self.run.total_steps}: loss {row['loss']:.4f}{alpha}, "
                  f"{row['step_seconds']:.2f} s/step", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Models for offline runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny", help="a random GPT-2 with the tokenizer of --tokenizer")
    tiny.add_argument("--tokenizer", required=True, help="tokenizer directory")
    tiny.add_argument("--out", required=True, help="directory to write the model into")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    for name, default in (("n_embd", 64), ("n_layer", 2), ("n_head", 2)):
        tiny.add_argument(f"--{name}", type=int, default=default, help=f"GPT2Config {name}")
    args = parser.parse_args()
    try:
        print(tiny_model(args.tokenizer, args.out, args.n_embd, args.n_layer, args.n_head, args.seed))
    except (ValueError, OSError) as err:
        sys.exit(f"plumbing.py tiny: {err}")
