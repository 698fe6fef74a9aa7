"""Seconds and peak memory of each phase of a training or evaluation run (OUT/usage.json, read by the
rehearsal's projection), measured around the reference's own functions, which know nothing of it.

    python -m experiments.usage arkd.py ARKD_FLAGS...           # arkd.py, plus OUT/usage.json
    python -m experiments.usage evaluate.py score SCORE_FLAGS...  # evaluate.py score, plus OUT/usage.json
"""
import contextlib
import functools
import json
import os
import resource
import sys
import time

import torch

import arkd
import evaluate
import plumbing
from lora import lora_parameters


def _resident_bytes(field):
    """VmRSS (now) or VmHWM (the peak) of /proc/self/status; without it, the peak since the start."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))    # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_memory_window(device):
    """The memory in use now, with the peak reset to it: CUDA's allocator, else resident memory
    (Linux resets the peak on clear_refs 5; elsewhere the peak so far is the baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _resident_bytes("VmRSS")
    except OSError:
        return _resident_bytes("VmHWM")


def peak_memory_bytes(device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _resident_bytes("VmHWM")


class Usage:
    """Seconds and peak memory of the phases of one process's work (loading, steps, generation, ...),
    written to OUT/usage.json (the rehearsal's projection reads it).

    `with usage.phase(name) as counts:` times the block and takes its peak memory; the block may add
    counts (prompts, positions). A phase that recurs (one optimizer step at a time) accumulates
    seconds and counts, and keeps the largest peak; last_seconds is its latest (the first warms up).
    """

    def __init__(self, device):
        self.device, self.phases = device, {}
        self.baseline = start_memory_window(device)        # the process before any model is loaded

    @contextlib.contextmanager
    def phase(self, name, **counts):
        started, start_bytes = time.perf_counter(), start_memory_window(self.device)
        yield counts
        entry = self.phases.setdefault(name, {"count": 0, "seconds": 0.0, "peak_gb": 0.0, "start_gb": start_bytes / 2**30})
        entry["count"] += 1
        entry["last_seconds"] = time.perf_counter() - started
        entry["seconds"] += entry["last_seconds"]
        entry["peak_gb"] = max(entry["peak_gb"], peak_memory_bytes(self.device) / 2**30)
        for key, value in counts.items():
            entry[key] = entry.get(key, 0) + value

    def write(self, path, **facts):
        if int(os.environ.get("RANK", 0)) != 0:        # one file per run, from rank 0
            return
        plumbing.write_atomic(path, json.dumps({"device": str(self.device), "baseline_gb": self.baseline / 2**30,
                                       "phases": self.phases, **facts}, indent=1))


def model_shape(model):
    """{params, bytes, layers, layer_params, full_layers} of a causal LM (bytes: of its weights as loaded).
    full_layers is the architecture's own depth when the model is a layer-cut stand-in (experiments.rehearsal
    init --layers); the projection scales by it."""
    layers = model.config.num_hidden_layers
    return {"params": sum(p.numel() for p in model.parameters()),
            "bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "layers": layers,
            "layer_params": sum(p.numel() for p in plumbing.blocks_of(model)[1][0].parameters()),
            "full_layers": getattr(model.config, "full_layers", layers)}


def timed(usage, module, name, phase, counts=None):
    """module.name made a phase of `usage` each time it is called; counts(args, result) adds counts."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with usage.phase(phase) as added:
            result = original(*args, **kwargs)
            added.update(counts(args, result) if counts else {})
        return result
    setattr(module, name, wrapper)


def measure_training(argv):
    """arkd.main(argv) with its loading, SeqKD sampling, steps, validation and checkpoints timed."""
    args = arkd.parse_args(argv)
    usage = Usage(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for name in ("load_models", "load_training_data", "build_training", "resume"):
        timed(usage, arkd, name, "load")
    timed(usage, arkd, "build_seqkd_data", "seqkd data", lambda a, sampled: {"prompts": sampled})
    timed(usage, arkd, "train_step", "step", lambda a, _: {"positions": sum(b["input_ids"].numel() for b in a[6]),
                                                           "sequences": sum(len(b["input_ids"]) for b in a[6])})
    timed(usage, arkd, "validate", "validation", lambda a, _: {"prompts": len(a[4])})
    timed(usage, arkd, "save_checkpoint", "checkpoint")
    result = arkd.main(argv)
    student, teacher, run = result["student"], result["teacher"], result["run"]
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    trainable += sum(p.numel() for p in lora_parameters(teacher)) if teacher is not None else 0
    usage.write(os.path.join(args.out, "usage.json"), kind="train", method=args.method, strategy=args.strategy,
                micro_batch=args.batch_size, grad_accum=run.grad_accum, world_size=run.world_size, bf16=run.bf16,
                shard=args.shard, trainable_params=trainable, student=model_shape(student),
                teacher=model_shape(teacher) if teacher is not None and args.method != "seqkd" else None)


def measure_evaluation(argv):
    """evaluate.main(argv) with its model loading and each (set, seed) timed."""
    args, loaded = evaluate.parse_args(argv), []
    usage = Usage(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    timed(usage, plumbing, "load_model", "load", lambda a, model: loaded.append(model) or {})
    timed(usage, evaluate, "evaluate_dataset", "evaluation", lambda a, result: {"prompts": result["n"]})
    evaluate.main(argv)
    usage.write(os.path.join(args.out, "usage.json"), kind="evaluate", batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, bf16=args.bf16, model=model_shape(loaded[0]))


if __name__ == "__main__":
    script, argv = (sys.argv[1:2] or [""])[0], sys.argv[2:]
    if script not in ("arkd.py", "evaluate.py"):
        sys.exit("usage: python -m experiments.usage arkd.py ARKD_FLAGS... | evaluate.py score SCORE_FLAGS...")
    try:
        measure_training(argv) if script == "arkd.py" else measure_evaluation(argv)
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.usage {script}: {err}")
