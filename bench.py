"""Benchmarks and measurements: losses.kd_pass against unfused formulations, the ARKD step against
the FKL step, the reward probe, the Figure-1 experiment, the GPU checklist and the rehearsal's
projection of a full run onto GPUs.

For N tokens and a vocabulary of V, each variant computes forward + backward of a KD loss:

    naive            0.5 FKL + 0.5 RKL with every ARKD policy statistic (entropies, top-1
                     agreement, AKL head share by a full sort), separate full-size softmax /
                     log_softmax tensors, autograd through all of it: the same quantities as kd_pass
    trl_gjsd         TRL's generalized JSD loss (beta 0.5) from its published equation, full
                     tensors, autograd: a peer's loss alone, no statistics (time and memory only)
    distillm         DistiLLM-style 0.5 FKL (as a cross-entropy) + 0.5 RKL, full tensors, autograd,
                     no statistics (time and memory only)
    kd_pass          losses.kd_pass: one chunked pass, closed-form gradients, every statistic
    kd_pass_no_akl   the same without the AKL head search (akl=False: what every strategy but akl
                     and arkd runs)
    kd_pass_inplace  kd_pass writing the gradient into the consumed logits (inplace_grad=True)
    floor            a lower bound: read both logit tensors, two exp per element, write a gradient

Each variant runs in its own subprocess (one thread by default, for stable timings); the parent
prints the median time over --repeats runs, the peak extra memory over the inputs (max RSS on CPU,
max_memory_allocated on CUDA) and the ratios to naive. --json prints one JSON object.

The logits are synthetic but shaped like a trained LM's: Gaussian noise over the vocabulary plus
8 boosted tokens per row whose top logit varies between rows (most rows peaked, some flat enough
that the AKL head search goes past the top 1024; the share is printed). --flat makes the teacher
flat (entropy about 10 nats, as early in training): the AKL search's hard case.

    python bench.py                          # N=4096, V=50257, fp32, CUDA when available
    python bench.py --dtype bf16 --n 1024 --json
    python bench.py --flat
    python bench.py --fused --n 4096 --hidden 768    # fused_kd_pass against kd_pass on logits

The step benchmark times whole optimizer steps of arkd.py on the offline toy task, ARKD (reward
forward and policy update included) against plain FKL, on random GPT-2s built from configs:

    python bench.py --step                   # CPU: teacher 3 x 240 (~4x the student 2 x 128), accumulation 4
    python bench.py --step --teacher_size 24,1024 --student_size 12,768 --step_batch 8   # GPU, GPT-2 shapes

The reward probe asks whether ARKD's immediate reward carries information about alpha for a given
student, teacher and step: from one identical start (weights, optimizer state, dropout masks) it
takes ONE optimizer step with each alpha of a grid, for K batches, and reports the reward per alpha
(on the batch trained on, as ARKD uses it, and on a held-out batch in eval mode), the FKL and RKL
drops, the best alpha and the signal-to-noise ratio the policy sees; a PNG of reward against alpha.
The training flags after `--` are arkd.py's (the student may be a checkpoint; its optimizer state
is used when training_state.pt is beside it; --lr is the step's learning rate):

    python bench.py --probe --probe_batches 16 -- --teacher T --student RUN/last --data_dir D --out PROBE

The projection reads the usage.json that every training and evaluation stage of `run.sh rehearsal`
writes (the real architectures on a CPU) and projects the full run's GPU memory and hours (how:
project_stage's docstring; the GPU speeds are assumed unless a gpu_check.json gives them):

    python bench.py --project runs/rehearsal-gpt2-120M --gpus 8 [--gpu_check_json gpu_check.json]
"""
import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import losses
from data import peak_memory_bytes, start_memory_window, write_atomic

VARIANTS = ("naive", "trl_gjsd", "distillm", "kd_pass", "kd_pass_no_akl", "kd_pass_inplace", "floor")
REFERENCE_ONLY = ("trl_gjsd", "distillm")     # other quantities: compared for time and memory, not for the loss
ALPHA, MU = 0.5, 0.5


def make_logits(n, vocab, dtype, device, seed=0, rows_per_chunk=16, flat=False):
    """Teacher and student logits [n, vocab], generated a few rows at a time straight into tensors
    of the target dtype, so that no full-size temporary inflates the memory baseline. flat: a teacher
    of high entropy (top logits 2..4 above the noise instead of 10..20), as early in training."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.empty(n, vocab, dtype=dtype, device=device)
    teacher = torch.empty(n, vocab, dtype=dtype, device=device)
    decay = torch.tensor([1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], device=device)
    for lo in range(0, n, rows_per_chunk):
        rows = min(rows_per_chunk, n - lo)
        t = torch.randn(rows, vocab, generator=g, device=device)
        top = (2 + 2 * torch.rand(rows, 1, generator=g, device=device)) if flat else \
            (10 + 10 * torch.rand(rows, 1, generator=g, device=device))         # top logit 2..4 or 10..20
        t.scatter_add_(1, torch.randint(0, vocab, (rows, 8), generator=g, device=device), top * decay)
        teacher[lo:lo + rows] = t
        student[lo:lo + rows] = torch.randn(rows, vocab, generator=g, device=device).mul_(0.7).add_(t, alpha=0.8)
    return student, teacher


def naive_step(student, teacher):
    """The unfused way: every quantity from its own full-size tensors, autograd through all."""
    s, t = student.float(), teacher.float()
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    fkl = (p * (log_p - log_q)).sum(-1)
    rkl = (q * (log_q - log_p)).sum(-1)
    with torch.no_grad():
        entropies = (-(p * log_p).sum(-1), -(q * log_q).sum(-1))
        top1 = (p.argmax(-1) == q.argmax(-1)).float()
        sorted_p, order = p.sort(-1, descending=True)
        in_head = sorted_p.cumsum(-1) <= MU
        in_head[:, 0] = True
        head = torch.zeros_like(in_head).scatter_(-1, order, in_head)
        err = (p - q).abs()
        share = (err * head).sum(-1) / err.sum(-1)
    loss = (ALPHA * fkl + (1 - ALPHA) * rkl).mean()
    loss.backward()
    return float(loss)


def trl_gjsd_step(student, teacher, beta=0.5):
    """TRL's generalized JSD loss as its published equation reads (full tensors, autograd): the
    mixture m = beta p + (1 - beta) q in log space, then beta KL(p || m) + (1 - beta) KL(q || m)."""
    log_q, log_p = torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)           # p (log p - log m)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)           # q (log q - log m)
    loss = (beta * kl_p + (1 - beta) * kl_q).sum() / student.shape[0]
    loss.backward()
    return float(loss)


def distillm_step(student, teacher):
    """DistiLLM-style 0.5 FKL + 0.5 RKL (full tensors, autograd, no statistics): the FKL as the
    cross-entropy -sum p log q, the RKL as sum q (log q - log p)."""
    s, t = student.float(), teacher.float()
    p, log_p = torch.softmax(t, -1), torch.log_softmax(t, -1)
    q, log_q = torch.softmax(s, -1), torch.log_softmax(s, -1)
    fkl = -(p * log_q).sum(-1)
    rkl = (q * (log_q - log_p)).sum(-1)
    loss = (ALPHA * fkl + (1 - ALPHA) * rkl).mean()
    loss.backward()
    return float(loss)


def kd_pass_step(student, teacher, inplace_grad=False, akl=True):
    mask = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    out = losses.kd_pass(student, teacher, mask, mu=MU, inplace_grad=inplace_grad, akl=akl)
    loss = losses.mix(out.fkl, out.rkl, ALPHA).sum() / out.stats[0].item()
    loss.backward()
    return float(loss)


def floor_step(student, teacher):
    """Read both tensors, two exp per element, write one gradient: no real method does less."""
    student, grad = student.detach(), torch.empty_like(student)
    chunk = losses._default_chunk_tokens(student.shape[1], student.device)
    for lo in range(0, student.shape[0], chunk):
        rows = slice(lo, lo + chunk)
        torch.add(torch.exp(student[rows].float()), torch.exp(teacher[rows].float()), out=grad[rows])


def topk_resolved_share(teacher, k=64):
    """Share of rows whose AKL head ends inside the top-k (the rest use the full sort)."""
    resolved = 0
    for lo in range(0, teacher.shape[0], 256):
        p = torch.softmax(teacher[lo:lo + 256].float(), -1)
        resolved += int((p.topk(k, -1).values.sum(-1) > MU).sum())
    return resolved / teacher.shape[0]


FUSED_VARIANTS = ("from_logits", "fused")


def hidden_inputs(n, hidden, vocab, device, seed=0):
    """Student and teacher last hidden states [n, hidden] and output weights [vocab, hidden]."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(*shape, generator=g, device=device) * scale
            for shape, scale in (((n, hidden), 1.0), ((vocab, hidden), 0.05), ((n, hidden), 1.0), ((vocab, hidden), 0.1))]


def run_fused_variant(args):
    """Child process: forward + backward of 0.5 FKL + 0.5 RKL from hidden states, either through the
    full [n, V] logits of both models (what the trainer does with kd_pass) or with fused_kd_pass."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w, th, tw = hidden_inputs(args.n, args.hidden, args.vocab, device)
    h.requires_grad_(), w.requires_grad_()
    mask = torch.ones(args.n, dtype=torch.bool, device=device)
    baseline, times = start_memory_window(device), []
    for _ in range(args.repeats):
        h.grad = w.grad = None
        start = time.perf_counter()
        if args.variant == "fused":
            out = losses.fused_kd_pass(h, w, th, tw, mask, akl=False)
        else:
            with torch.no_grad():
                teacher_logits = th @ tw.T
            out = losses.kd_pass(h @ w.T, teacher_logits, mask, inplace_grad=True, akl=False)
        loss = losses.mix(out.fkl, out.rkl, ALPHA).mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_memory_bytes(device)
    print(json.dumps({"variant": args.variant, "median_s": statistics.median(times), "loss": float(loss),
                      "peak_extra_bytes": max(0, peak - baseline)}))


def fused_benchmark(args):
    """fused_kd_pass against kd_pass on materialised logits, side by side, at V = 50257 and 128256."""
    rows = []
    for vocab in (50257, 128256):
        results = {}
        for variant in FUSED_VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--n", str(args.n), "--vocab",
                   str(vocab), "--hidden", str(args.hidden), "--device", args.device, "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"bench: {variant} failed:\n{done.stderr[-2000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        if abs(results["fused"]["loss"] - results["from_logits"]["loss"]) > 1e-4 * abs(results["from_logits"]["loss"]):
            sys.exit(f"bench: fused loss {results['fused']['loss']} differs from {results['from_logits']['loss']}")
        rows.append({"vocab": vocab, **results, "time_ratio": results["fused"]["median_s"] / results["from_logits"]["median_s"],
                     "memory_ratio": results["fused"]["peak_extra_bytes"] / max(results["from_logits"]["peak_extra_bytes"], 1)})
    summary = {"n": args.n, "hidden": args.hidden, "device": args.device, "rows": rows}
    if args.json:
        return print(json.dumps(summary, indent=1))
    for r in rows:
        print(f"N={args.n} d={args.hidden} V={r['vocab']}: from logits {r['from_logits']['median_s']:.3f} s, "
              f"{r['from_logits']['peak_extra_bytes'] / 2**20:.0f} MiB; fused {r['fused']['median_s']:.3f} s, "
              f"{r['fused']['peak_extra_bytes'] / 2**20:.0f} MiB; fused / from logits: time {r['time_ratio']:.3f}x, "
              f"memory {r['memory_ratio']:.3f}x")


def run_variant(args):
    """Child process: time one variant; prints one JSON line."""
    if args.variant in FUSED_VARIANTS:
        return run_fused_variant(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    step = {"naive": naive_step, "floor": floor_step, "kd_pass": kd_pass_step, "trl_gjsd": trl_gjsd_step,
            "distillm": distillm_step, "kd_pass_no_akl": lambda s, t: kd_pass_step(s, t, akl=False),
            "kd_pass_inplace": lambda s, t: kd_pass_step(s, t, inplace_grad=True)}[args.variant]
    # A small warm-up run first: loading kernels and library pages is not the variant's memory.
    step(*(x.requires_grad_(i == 0) for i, x in enumerate(make_logits(64, args.vocab, dtype, device))))
    pristine, teacher = make_logits(args.n, args.vocab, dtype, device, flat=args.flat)
    student = pristine.clone().requires_grad_()
    baseline = start_memory_window(device)
    times, loss = [], None
    for _ in range(args.repeats):
        with torch.no_grad():
            student.copy_(pristine)                 # kd_pass_inplace consumed the last logits
        student.grad = None
        start = time.perf_counter()
        loss = step(student, teacher)         # a float, or None for the floor
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_memory_bytes(device)
    result = {"variant": args.variant, "median_s": statistics.median(times), "times_s": times,
              "peak_extra_bytes": max(0, peak - baseline), "loss": loss, "input_bytes": 2 * pristine.numel() * pristine.element_size()}
    if args.variant == "kd_pass":
        result["topk_resolved_share"] = topk_resolved_share(teacher)
        p = torch.softmax(teacher[:256].float(), -1)
        result["teacher_entropy"] = float(-(p * torch.log_softmax(teacher[:256].float(), -1)).sum(-1).mean())
    print(json.dumps(result))


def compare_variants(args):
    """Each variant of args.variants in its own subprocess; their times, peak memories and ratios."""
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--n", str(args.n),
               "--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device,
               "--repeats", str(args.repeats), "--threads", str(args.threads)] + (["--flat"] if args.flat else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench: variant {variant} failed:\n{done.stderr[-2000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    naive = results["naive"]
    for name, r in results.items():     # a fast variant that computes something else is no result
        if name not in REFERENCE_ONLY and r["loss"] is not None and abs(r["loss"] - naive["loss"]) > 1e-4 * abs(naive["loss"]) + 1e-6:
            sys.exit(f"bench: {name} loss {r['loss']} differs from naive {naive['loss']}")
    for r in results.values():
        r["time_ratio"] = r["median_s"] / naive["median_s"]
        r["peak_memory_ratio"] = r["peak_extra_bytes"] / naive["peak_extra_bytes"] if naive["peak_extra_bytes"] else None
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    summary = {"n": args.n, "vocab": args.vocab, "dtype": args.dtype, "device": device_name, "flat": args.flat,
               "repeats": args.repeats, "variants": results}
    for peer in REFERENCE_ONLY:        # kd_pass against each peer formulation, measured in the same run
        if peer in results and "kd_pass" in results:
            summary[f"kd_pass_over_{peer}"] = {
                "time": results["kd_pass"]["median_s"] / results[peer]["median_s"],
                "memory": results["kd_pass"]["peak_extra_bytes"] / max(results[peer]["peak_extra_bytes"], 1)}
    if "kd_pass" in results:
        summary["time_ratio"] = results["kd_pass"]["time_ratio"]
        summary["peak_memory_ratio"] = results["kd_pass"]["peak_memory_ratio"]
    return summary


def step_benchmark(args):
    """Median optimizer-step time of arkd.py for --strategy arkd over --strategy fkl, measured in
    alternating subprocesses on the same data, models and batches."""
    import data
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = data.write_synthetic(os.path.join(tmp, "data"))
        texts = [r["prompt"] + r["references"][0] for r in data.load_records("dolly_train", data_dir)]
        data.train_tokenizer(texts).save_pretrained(os.path.join(tmp, "tok"))
        for role, spec in (("teacher", args.teacher_size), ("student", args.student_size)):
            layers, width = map(int, spec.split(","))
            data.tiny_model(os.path.join(tmp, "tok"), os.path.join(tmp, role), width, layers, n_head=max(1, width // 64))
        from transformers import AutoModelForCausalLM
        params = {role: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(os.path.join(tmp, role)).parameters())
                  for role in ("teacher", "student")}
        times, tokens = {"fkl": [], "arkd": []}, {"fkl": [], "arkd": []}
        for round_ in range(args.repeats):
            for strategy in times:
                out = os.path.join(tmp, f"{strategy}{round_}")
                cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "arkd.py"),
                       "--method", "kd", "--strategy", strategy, "--teacher", os.path.join(tmp, "teacher"),
                       "--student", os.path.join(tmp, "student"), "--data_dir", data_dir, "--out", out,
                       "--max_steps", str(args.steps), "--batch_size", str(args.step_batch), "--grad_accum", "4",
                       "--eval_every", "0", "--val_examples", "1", "--max_new_tokens", "1", "--warmup_ratio", "0"]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"bench: arkd.py --strategy {strategy} failed:\n{done.stderr[-2000:]}")
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f if '"step_seconds"' in line]
                times[strategy] += [r["step_seconds"] for r in rows[3:]]      # the first steps warm up
                tokens[strategy] += [r["tokens_per_second"] for r in rows[3:]]
    medians = {s: statistics.median(t) for s, t in times.items()}
    return {"teacher_params": params["teacher"], "student_params": params["student"],
            "size_ratio": params["teacher"] / params["student"], "grad_accum": 4, "batch": args.step_batch,
            "median_step_s": medians, "step_time_ratio": medians["arkd"] / medians["fkl"],
            "tokens_per_second": {s: statistics.median(t) for s, t in tokens.items()},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"}


def print_step(summary):
    print(f"teacher {summary['teacher_params'] / 1e6:.2f}M params, student {summary['student_params'] / 1e6:.2f}M "
          f"({summary['size_ratio']:.1f}x), accumulation 4, {summary['device']}")
    medians = summary["median_step_s"]
    print(f"median step: fkl {medians['fkl'] * 1e3:.1f} ms, arkd {medians['arkd'] * 1e3:.1f} ms, "
          f"ratio {summary['step_time_ratio']:.3f} (baseline: the FKL step)")


def generation_speed(layers, width, new_tokens, prompts=64, batch=32):
    """Prompts per second of evaluate.generate for a random GPT-2 of the given shape (vocabulary 50257),
    100-token prompts, `new_tokens` sampled (no EOS stops a random model early: the worst case)."""
    import evaluate
    from transformers import GPT2Config, GPT2LMHeadModel
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                                       bos_token_id=50256, eos_token_id=50256)).to(device).eval()

    class Tokenizer:                                   # what generate needs of a tokenizer
        pad_token_id = eos_token_id = 50256

        @staticmethod
        def batch_decode(ids, skip_special_tokens=True):
            return [" ".join(map(str, row.tolist())) for row in ids]
    prompt_ids = torch.randint(0, 50000, (prompts, 100)).tolist()
    start_memory_window(device)
    start = time.perf_counter()
    evaluate.generate(model, Tokenizer(), prompt_ids, 10, batch, new_tokens, progress=False)
    seconds = time.perf_counter() - start
    return {"layers": layers, "width": width, "new_tokens": new_tokens, "prompts": prompts, "batch": batch,
            "prompts_per_second": prompts / seconds,
            "peak_bytes": peak_memory_bytes(device)}


def gpu_check(args):
    """The GPU checklist in one command: kd_pass against the unfused formulations at real sizes (fp32 and
    bf16), the ARKD step against the FKL step at GPT-2 120M / XL shapes, training tokens per second,
    evaluation prompts per second at 256 new tokens, peak memory of each; OUT/gpu_check.json and .md.
    Without CUDA it runs the same checks at reduced sizes, to show that it works."""
    cuda = torch.cuda.is_available()
    n, vocab = (4096, 50257) if cuda else (256, 50257)
    steps = dict(teacher_size="48,1600", student_size="12,768", step_batch=8, steps=13) if cuda else \
        dict(teacher_size="2,128", student_size="1,64", step_batch=4, steps=8)
    report = {"device": torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s) (reduced sizes)",
              "kd_pass": {}, "generation": None, "step": None}
    for dtype in ("fp32", "bf16"):
        report["kd_pass"][dtype] = compare_variants(argparse.Namespace(**{**vars(args), "n": n, "vocab": vocab, "dtype": dtype,
                                                                          "device": "cuda" if cuda else "cpu",
                                                                          "variants": ",".join(VARIANTS)}))
    report["step"] = step_benchmark(argparse.Namespace(**{**vars(args), **steps, "repeats": 1}))
    report["generation"] = generation_speed(12, 768, 256) if cuda else generation_speed(1, 64, 16, prompts=8, batch=8)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# GPU check: {report['device']}", "", "| check | value | baseline |", "| --- | --- | --- |"]
    for dtype, summary in report["kd_pass"].items():
        for name, r in summary["variants"].items():
            lines.append(f"| kd loss {dtype} N={n} V={vocab}: {name} | {r['median_s']:.4f} s, "
                         f"{r['peak_extra_bytes'] / 2**20:.0f} MiB | {r['time_ratio']:.3f}x time of naive |")
    s = report["step"]
    lines += [f"| ARKD step / FKL step (teacher {s['teacher_params'] / 1e6:.0f}M, student {s['student_params'] / 1e6:.0f}M) "
              f"| {s['step_time_ratio']:.3f}x | the FKL step, {s['median_step_s']['fkl'] * 1e3:.1f} ms |",
              f"| training tokens per second (FKL, ARKD) | {s['tokens_per_second']['fkl']:.0f}, "
              f"{s['tokens_per_second']['arkd']:.0f} | |",
              f"| evaluation, {report['generation']['new_tokens']} new tokens | "
              f"{report['generation']['prompts_per_second']:.2f} prompts/s, "
              f"{report['generation']['peak_bytes'] / 2**20:.0f} MiB peak | |"]
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


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

    Memory per GPU = the weights of the uncut models (their bytes here, scaled by parameter count)
    + gradients and AdamW moments (12 bytes per trained parameter) + the working memory of a step or
    a generation batch (activations, logits, KV cache): the peak measured here less the baseline
    process, weights and optimizer state, scaled linearly by the batch and, for a layer-cut stand-in,
    by the depth of the models that backpropagate (an upper bound: logits do not grow with depth)
    + DDP's gradient buckets (4 bytes per parameter) on more than one GPU. Not included: the CUDA
    context and allocator slack (about 1 GB). Time: the full run's FLOPs counted from the shapes (flops_per_token) over --gpu_tflops
    sustained per GPU; generation (evaluation, validation, SeqKD sampling) as decoding steps of
    --decode_ms each.
    """
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
    row["gpu_gb"] = (sum(s["bytes"] * scaled(s) for s in models) / gib + 12 * trained_full / gib
                     + working * depth * micro / usage["micro_batch"]
                     + (4 * full_params(student) / gib if args.gpus > 1 else 0))
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
    """(sustained TFLOP/s, ms per decoding step) from a `bench.py --gpu_check` report: the FKL step's
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
    rows = []
    for name, folder in found:
        path = os.path.join(folder, "usage.json")
        if os.path.isfile(path):
            with open(path) as f:
                usage = json.load(f)
            try:
                rows.append(project_stage(name, usage, args))
            except KeyError as err:
                raise ValueError(f"{path} lacks {err} (written by an older version? run that stage again)") from None
    if not rows:
        raise ValueError(f"{out}: no usage.json of a training or evaluation stage (run bash run.sh rehearsal first)")
    lines = [f"# Rehearsal of PAIR={args.pair}: measured here, projected for {args.gpus} GPU(s)", "",
             f"Here: {torch.get_num_threads()} CPU thread(s), bf16 autocast, random weights in the real shapes "
             f"(layers kept / the architecture's); a step's time is the stage's last step (the first warms up). "
             f"Projection: micro-batch {min(8, 32 // args.gpus)} per GPU, "
             f"{args.gpu_tflops:.3g} TFLOP/s sustained per GPU and {args.decode_ms:.3g} ms per decoding step "
             + (f"(measured: {args.gpu_check_json})" if args.gpu_check_json else "(assumed; `bench.py --gpu_check` "
                "measures both, `--gpu_check_json` takes them)")
             + ", the full run's step and prompt counts (bench.py FULL_RUN).", "",
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


def modes_experiment(args):
    """Figure 1 of the paper made real: FKL (mean-seeking), RKL (mode-seeking) and ARKD students of a
    teacher whose answers have several valid modes (data.write_modes). For each dev prompt every
    model samples --modes_samples answers; coverage = share of the listed words it produces at least
    once, precision = share of its samples that are one of them. Writes OUT/modes.json and modes.png."""
    import arkd
    import data
    import evaluate
    out = args.out
    data_dir = data.write_modes(os.path.join(out, "data"))
    texts = [r["prompt"] + r["references"][0] for r in data.load_records("dolly_train", data_dir)]
    data.train_tokenizer(texts).save_pretrained(os.path.join(out, "tokenizer"))
    student_layers, student_width = map(int, args.modes_student.split(","))
    for role, width, layers, seed in (("teacher", 128, 2, 1), ("student", student_width, student_layers, 2)):
        data.tiny_model(os.path.join(out, "tokenizer"), os.path.join(out, f"{role}-init"), width, layers, seed=seed)
    common = ["--data_dir", data_dir, "--batch_size", "16", "--grad_accum", "1", "--eval_every", "0",
              "--val_examples", "16", "--max_new_tokens", "6", "--warmup_ratio", "0.05"]

    def train(name, *flags):
        if not os.path.isdir(os.path.join(out, name, "best")):
            arkd.main(common + ["--out", os.path.join(out, name), *flags])
        return os.path.join(out, name, "best")
    models = {"teacher": train("teacher", "--method", "sft", "--student", os.path.join(out, "teacher-init"),
                               "--max_steps", str(4 * args.modes_steps), "--lr", "3e-3")}
    student = train("student", "--method", "sft", "--student", os.path.join(out, "student-init"), "--max_steps",
                    str(args.modes_steps // 4), "--lr", "3e-3")
    for strategy in ("fkl", "rkl", "arkd"):
        for seed in args.modes_seeds.split():
            models[f"{strategy}-s{seed}"] = train(f"{strategy}-s{seed}", "--method", "kd", "--strategy", strategy,
                                                  "--teacher", models["teacher"], "--student", student, "--seed", seed,
                                                  "--max_steps", str(args.modes_steps), "--lr", "3e-3")
    records = data.load_records("dolly_dev", data_dir)[:args.modes_prompts]
    results = {}
    for name, path in models.items():
        tokenizer = evaluate.load_tokenizer(path)
        model = evaluate.load_model(path, torch.device("cpu"), vocab_size=len(tokenizer)).eval()
        examples, _ = data.encode_records(tokenizer, records, "modes")
        samples = [evaluate.generate(model, tokenizer, [e["prompt_ids"] for e in examples], seed, 64, 6, progress=False)
                   for seed in range(args.modes_samples)]
        results[name] = evaluate.coverage_and_precision(records, samples)
    with open(os.path.join(out, "modes.json"), "w") as f:
        json.dump({"samples": args.modes_samples, "prompts": len(records), "results": results}, f, indent=1)
    plot_modes(results, os.path.join(out, "modes.png"))
    for name, r in results.items():
        print(f"{name:>10}: coverage {r['coverage']:.3f}, precision {r['precision']:.3f}")
    return results


def plot_modes(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colours = {"teacher": "black", "fkl": "tab:blue", "rkl": "tab:red", "arkd": "tab:green"}
    for name, r in results.items():
        kind = name.split("-")[0]
        ax.scatter(r["coverage"], r["precision"], color=colours[kind], label=kind if name.endswith(("s1", "teacher")) else None)
    ax.set(xlabel="coverage: share of the valid answers produced", ylabel="precision: share of samples valid",
           title="mean- vs mode-seeking on multi-modal answers", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class FixedAction:
    """Stands in for the ARKD policy in arkd.train_step: always the same alpha; keeps the reward."""

    def __init__(self, alpha):
        self.last_alpha, self.last_reward, self.last_beta, self.reward = alpha, 0.0, (None, None), None

    def act(self, state):
        return self.last_alpha

    def store_reward(self, reward):
        self.reward = reward
        return False                            # never an update

    def drop_action(self):
        self.reward = float("nan")


def reward_probe(args, train_argv):
    """One step per alpha from an identical start, K batches; writes OUT/probe.json and probe.png."""
    import copy
    import arkd
    from losses import IGNORE_INDEX, kd_pass, stat_means
    targs = arkd.parse_args(train_argv + ["--strategy", "arkd", "--reward_every", "1"])
    run = arkd.start(targs)
    torch.manual_seed(targs.seed)                # the dropout masks, the same on a rerun
    tokenizer, student, teacher = arkd.load_models(targs, run)
    examples, _, _ = arkd.load_training_data(targs, run, tokenizer, targs.data_dir)
    optimizer = torch.optim.AdamW(student.parameters(), lr=targs.lr, weight_decay=targs.weight_decay)
    state_path = os.path.join(targs.student, "training_state.pt")
    if os.path.isfile(state_path):
        optimizer.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True)["optimizer"])
        for group in optimizer.param_groups:       # the checkpoint's own lr is its last scheduled one: use --lr
            group["lr"] = targs.lr
    start_model, start_optimizer = copy.deepcopy(student.state_dict()), copy.deepcopy(optimizer.state_dict())
    alphas = [float(a) for a in args.probe_alphas.split(",")]

    @torch.no_grad()
    def heldout_kls(batch):                     # eval mode: no dropout, so before and after compare
        student.eval()
        targets = batch["targets"].to(run.device)
        out = kd_pass(arkd.forward(student, batch, run), arkd.forward(teacher, batch, run),
                      targets != IGNORE_INDEX, targs.tau, run.vocab_size, target_ids=targets)
        student.train()
        return stat_means(out.stats)

    rows = []
    for k in range(args.probe_batches):
        batches = arkd.micro_batches(examples, args.probe_step + k, targs, run)
        heldout = arkd.micro_batches(examples, args.probe_step + k + args.probe_batches, targs, run)[0]
        rng = torch.get_rng_state()
        for alpha in alphas:
            student.load_state_dict(start_model)
            optimizer.load_state_dict(copy.deepcopy(start_optimizer))   # step() changes the state in place
            torch.set_rng_state(rng)                                     # the same dropout masks for every alpha
            before, action = heldout_kls(heldout), FixedAction(alpha)
            row, _ = arkd.train_step(targs, run, student, teacher, optimizer, action, batches, args.probe_step + k)
            after = heldout_kls(heldout)
            rows.append({"batch": k, "alpha": alpha, "reward": action.reward,
                         "heldout_reward": (before["fkl"] - after["fkl"]) / before["fkl"] + (before["rkl"] - after["rkl"]) / before["rkl"],
                         "heldout_fkl_drop": (before["fkl"] - after["fkl"]) / before["fkl"],
                         "heldout_rkl_drop": (before["rkl"] - after["rkl"]) / before["rkl"]})
    summary = summarise_probe(rows, alphas)
    os.makedirs(targs.out, exist_ok=True)
    with open(os.path.join(targs.out, "probe.json"), "w") as f:
        json.dump({"student": targs.student, "teacher": targs.teacher, "lr": targs.lr, "batches": args.probe_batches,
                   **summary, "rows": rows}, f, indent=1)
    plot_probe(summary, alphas, os.path.join(targs.out, "probe.png"))
    for name in ("reward", "heldout_reward"):
        s = summary[name]
        print(f"{name}: " + ", ".join(f"alpha {a:g}: {m:+.4f} +- {e:.4f}" for a, m, e in zip(alphas, s["mean"], s["stderr"]))
              + f"; best alpha {s['best_alpha']:g}, signal-to-noise {s['snr']:.2f}")
    return summary


def summarise_probe(rows, alphas):
    """Per alpha: mean and standard error over batches; the best alpha; SNR = (max - min over alpha of
    the mean) / (the std across batches, averaged over alpha)."""
    summary = {}
    for name in ("reward", "heldout_reward", "heldout_fkl_drop", "heldout_rkl_drop"):
        per_alpha = [[r[name] for r in rows if r["alpha"] == a] for a in alphas]
        means = [statistics.fmean(v) for v in per_alpha]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_alpha]
        spread = statistics.fmean(stds)
        summary[name] = {"mean": means, "stderr": [s / len(v) ** 0.5 for s, v in zip(stds, per_alpha)],
                         "best_alpha": alphas[means.index(max(means))],
                         "snr": (max(means) - min(means)) / spread if spread > 0 else float("inf")}
    return summary


def plot_probe(summary, alphas, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, label in (("reward", "on the batch trained on (ARKD's reward)"), ("heldout_reward", "on a held-out batch")):
        ax.errorbar(alphas, summary[name]["mean"], yerr=summary[name]["stderr"], marker="o", capsize=3,
                    label=f"{label}, SNR {summary[name]['snr']:.2f}")
    ax.set(xlabel="alpha (FKL weight) of the one step", ylabel="immediate reward", title="reward probe (mean +- s.e.)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--n", type=int, default=4096, help="tokens")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="logit dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--flat", action="store_true", help="a high-entropy teacher (the AKL head search's hard case)")
    parser.add_argument("--fused", action="store_true", help="fused_kd_pass against kd_pass on logits, V 50257 and 128256")
    parser.add_argument("--hidden", type=int, default=768, help="--fused: hidden size")
    parser.add_argument("--gpu_check", action="store_true", help="the GPU checklist (reduced sizes without CUDA); "
                        "writes --out/gpu_check.json and .md")
    parser.add_argument("--step", action="store_true", help="step benchmark: ARKD step over FKL step in arkd.py")
    parser.add_argument("--steps", type=int, default=43, help="--step: optimizer steps per run")
    parser.add_argument("--teacher_size", default="3,240", help="--step: teacher layers,width")
    parser.add_argument("--student_size", default="2,128", help="--step: student layers,width")
    parser.add_argument("--step_batch", type=int, default=4, help="--step: sequences per micro-batch")
    parser.add_argument("--probe", action="store_true", help="reward probe; arkd.py's training flags follow --")
    parser.add_argument("--probe_batches", type=int, default=16, help="--probe: batches (K), each from the same start")
    parser.add_argument("--probe_alphas", default="0,0.25,0.5,0.75,1", help="--probe: the alpha grid")
    parser.add_argument("--probe_step", type=int, default=0, help="--probe: the data step the batches come from")
    parser.add_argument("--modes", action="store_true", help="the Figure-1 experiment (coverage and precision)")
    parser.add_argument("--out", default=None, help="--modes, --gpu_check: output directory (default runs/bench); "
                        "--project: default OUT/report")
    parser.add_argument("--modes_steps", type=int, default=400, help="--modes: KD steps per student")
    parser.add_argument("--modes_seeds", default="1 2 3", help="--modes: training seeds per strategy")
    parser.add_argument("--modes_samples", type=int, default=16, help="--modes: answers sampled per prompt")
    parser.add_argument("--modes_student", default="1,24", help="--modes: student layers,width")
    parser.add_argument("--modes_prompts", type=int, default=60, help="--modes: dev prompts")
    parser.add_argument("--project", metavar="OUT", help="run.sh rehearsal's table from the usage.json files under "
                        "OUT, with the full run projected onto GPUs; written to --out/rehearsal.md and .json")
    parser.add_argument("--pair", default="gpt2-120M", help="--project: the pair rehearsed (for the heading)")
    parser.add_argument("--gpus", type=int, default=8, choices=(1, 2, 4, 8, 16, 32),
                        help="--project: GPUs of the full run (a divisor of the global batch 32)")
    parser.add_argument("--gpu_tflops", type=float, default=100.0, help="--project: sustained bf16 TFLOP/s per GPU (assumed)")
    parser.add_argument("--decode_ms", type=float, default=30.0, help="--project: ms per generation step of a batch (assumed)")
    parser.add_argument("--gpu_check_json", help="--project: take both speeds from this gpu_check.json instead")
    parser.add_argument("--variant", help=argparse.SUPPRESS)                 # set in the child
    argv = sys.argv[1:]
    train_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.out = args.out or (os.path.join(args.project, "report") if args.project else "runs/bench")
    if args.modes:
        return modes_experiment(args)
    if args.project:
        return project(args)
    if args.probe:
        if args.probe_batches < 2:
            parser.error("--probe_batches must be >= 2 (the noise is measured across batches)")
        return reward_probe(args, train_argv)
    if args.variant:
        return run_variant(args)
    if args.step:
        summary = step_benchmark(args)
        return print(json.dumps(summary, indent=1)) if args.json else print_step(summary)
    if args.gpu_check:
        return gpu_check(args)
    if args.fused:
        return fused_benchmark(args)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "naive" not in variants:
        parser.error(f"--variants: unknown {unknown}; choose from {VARIANTS}, naive included")
    summary = compare_variants(args)
    results, naive, device_name = summary["variants"], summary["variants"]["naive"], summary["device"]
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"N={args.n} V={args.vocab} {args.dtype} on {device_name}; inputs "
          f"{naive['input_bytes'] / 2**20:.0f} MiB; median of {args.repeats}")
    print(f"{'variant':<16} {'time s':>8} {'x naive':>8} {'peak extra MiB':>15} {'x naive':>8}")
    for name, r in results.items():
        print(f"{name:<16} {r['median_s']:8.3f} {r['time_ratio']:8.3f} "
              f"{r['peak_extra_bytes'] / 2**20:15.1f} {r['peak_memory_ratio'] or float('nan'):8.3f}")
    if "kd_pass" in results:
        print(f"teacher entropy {results['kd_pass']['teacher_entropy']:.1f} nats; AKL head found in the top-64 for "
              f"{100 * results['kd_pass']['topk_resolved_share']:.0f}% of the rows (the rest: the top 1024, then the threshold search)")
    for peer in REFERENCE_ONLY:
        if f"kd_pass_over_{peer}" in summary:
            r = summary[f"kd_pass_over_{peer}"]
            print(f"kd_pass (all policy statistics) over {peer} (its loss only): time {r['time']:.3f}x, peak memory {r['memory']:.3f}x")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"bench.py: {err}")
