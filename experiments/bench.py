"""Speed: losses.kd_pass against unfused formulations, the ARKD step against the FKL step, the GPU
checklist. Every figure is a ratio of variants measured side by side in one run, its baseline named.
Each variant computes forward + backward of a KD loss over N tokens and V columns, in its own process
(one thread by default); the parent prints median times, the peak extra memory over the inputs and
the ratios (--json: one JSON object):

    naive            0.5 FKL + 0.5 RKL and every policy statistic (the AKL head by a full sort) with
                     full-size tensors and autograd: the same quantities as kd_pass
    trl_gjsd         TRL's generalized JSD (beta 0.5) from its published equation: its loss alone
    distillm         DistiLLM-style 0.5 FKL (as a cross-entropy) + 0.5 RKL: its loss alone
    kd_pass          losses.kd_pass: one chunked pass, closed-form gradients, every statistic
    kd_pass_no_akl   the same without the AKL head search (what every strategy but akl and arkd runs)
    kd_pass_inplace  kd_pass writing the gradient into the consumed logits (inplace_grad=True)
    floor            a lower bound: read both logit tensors, two exp per element, write a gradient

The logits are synthetic, shaped like a trained LM's (noise plus 8 boosted tokens per row): --teacher
peaked (default), flat (about 10 nats: the AKL search's hard case) or onehot. --akl times kd_pass with
and without the AKL search and the floor on every teacher in alternating rounds; --against REV times
this tree's kd_pass against git revision REV's losses.py in the same way (run it when changing
losses.py). --step times whole optimizer steps of arkd.py on the toy task (ARKD, the peer
divergences, a student-generated share) against the FKL step; --gpu_check runs all of it at the full
run's sizes (reduced without CUDA) with evaluation prompts per second (experiments.rehearsal reads it).

    python -m experiments.bench                          # N=4096, V=50257, fp32, CUDA when available
    python -m experiments.bench --akl --n 1024 --repeats 5
    python -m experiments.bench --against HEAD~1 --n 1024 --repeats 5
    python -m experiments.bench --step --teacher_size 24,1024 --student_size 12,768 --step_batch 8   # GPT-2 shapes
    python -m experiments.bench --sgo --repeats 5      # student-generated responses: batched vs one at a time
    python -m experiments.bench --gpu_check --out runs/gpu_check      # gpu_check.json and gpu_check.md
"""
import argparse
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
import plumbing
from experiments.usage import peak_memory_bytes, start_memory_window
from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the reference

VARIANTS = ("naive", "trl_gjsd", "distillm", "kd_pass", "kd_pass_no_akl", "kd_pass_inplace", "floor")
REFERENCE_ONLY = ("trl_gjsd", "distillm")     # other quantities: compared for time and memory, not for the loss
ALPHA, MU = 0.5, 0.5


TEACHERS = {"peaked": (10, 10), "flat": (2, 2), "onehot": (40, 10)}     # top logit: low + width * U(0, 1)


def make_logits(n, vocab, dtype, device, seed=0, rows_per_chunk=16, kind="peaked"):
    """Teacher and student logits [n, vocab], generated a few rows at a time straight into tensors
    of the target dtype, so that no full-size temporary inflates the memory baseline. kind, the teacher's:
    "peaked" (top logits 10..20 above the noise, a trained LM's), "flat" (2..4: high entropy, as early
    in training) or "onehot" (40..50: the top-1 holds nearly all the mass)."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.empty(n, vocab, dtype=dtype, device=device)
    teacher = torch.empty(n, vocab, dtype=dtype, device=device)
    decay = torch.tensor([1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], device=device)
    for lo in range(0, n, rows_per_chunk):
        rows = min(rows_per_chunk, n - lo)
        t = torch.randn(rows, vocab, generator=g, device=device)
        low, width = TEACHERS[kind]
        top = low + width * torch.rand(rows, 1, generator=g, device=device)
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


def top1_resolved_share(teacher):
    """Share of rows whose AKL head is the top-1 alone (its mass exceeds mu); the rest take the bins."""
    return sum(int((torch.softmax(teacher[lo:lo + 256].float(), -1).amax(-1) > MU).sum())
               for lo in range(0, teacher.shape[0], 256)) / teacher.shape[0]


def run_variant(args):
    """Child process: time one variant (with --losses, that file's kd_pass); prints one JSON line."""
    global losses
    if args.losses:
        import importlib.util
        spec = importlib.util.spec_from_file_location("losses_under_test", args.losses)
        losses = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(losses)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    step = {"naive": naive_step, "floor": floor_step, "kd_pass": kd_pass_step, "trl_gjsd": trl_gjsd_step,
            "distillm": distillm_step, "kd_pass_no_akl": lambda s, t: kd_pass_step(s, t, akl=False),
            "kd_pass_inplace": lambda s, t: kd_pass_step(s, t, inplace_grad=True)}[args.variant]
    # A small warm-up run first: loading kernels and library pages is not the variant's memory.
    step(*(x.requires_grad_(i == 0) for i, x in enumerate(make_logits(64, args.vocab, dtype, device))))
    pristine, teacher = make_logits(args.n, args.vocab, dtype, device, kind=args.teacher)
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
        result["top1_resolved_share"] = top1_resolved_share(teacher)
        p = torch.softmax(teacher[:256].float(), -1)
        result["teacher_entropy"] = float(-(p * torch.log_softmax(teacher[:256].float(), -1)).sum(-1).mean())
    print(json.dumps(result))


def compare_variants(args):
    """Each variant of args.variants in its own subprocess; their times, peak memories and ratios."""
    results = {variant: child(args, variant, args.teacher, args.repeats) for variant in args.variants.split(",")}
    naive = results["naive"]
    for name, r in results.items():     # a fast variant that computes something else is no result
        if name not in REFERENCE_ONLY and r["loss"] is not None and abs(r["loss"] - naive["loss"]) > 1e-4 * abs(naive["loss"]) + 1e-6:
            sys.exit(f"bench: {name} loss {r['loss']} differs from naive {naive['loss']}")
    for r in results.values():
        r["time_ratio"] = r["median_s"] / naive["median_s"]
        r["peak_memory_ratio"] = r["peak_extra_bytes"] / naive["peak_extra_bytes"] if naive["peak_extra_bytes"] else None
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    summary = {"n": args.n, "vocab": args.vocab, "dtype": args.dtype, "device": device_name, "teacher": args.teacher,
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


def child(args, variant, teacher, repeats=1, losses_file=None):
    """One subprocess timing `variant` on `teacher` (with losses_file's kd_pass when given): its JSON."""
    cmd = [sys.executable, "-m", "experiments.bench", "--variant", variant, "--n", str(args.n), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--device", args.device, "--repeats", str(repeats), "--threads", str(args.threads),
           "--teacher", teacher] + (["--losses", losses_file] if losses_file else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"bench: variant {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternating(args, runs):
    """Median seconds of each (name: (variant, teacher, losses file)) over --repeats rounds, the runs of a
    round one after another in their own subprocesses: a noisy machine slows all of them alike."""
    times, facts = {name: [] for name in runs}, {}
    for _ in range(args.repeats):
        for name, (variant, teacher, losses_file) in runs.items():
            result = child(args, variant, teacher, losses_file=losses_file)
            times[name].append(result["median_s"])
            facts[name] = {k: result[k] for k in ("teacher_entropy", "top1_resolved_share") if k in result}
    return {name: statistics.median(t) for name, t in times.items()}, facts


def akl_benchmark(args):
    """kd_pass with the AKL head search over kd_pass without it, and the floor, on each teacher: the
    ratio of the median times over --repeats alternating rounds."""
    summary = {}
    for teacher in TEACHERS:
        runs = {v: (v, teacher, None) for v in ("kd_pass", "kd_pass_no_akl", "floor")}
        medians, facts = alternating(args, runs)
        summary[teacher] = {**facts["kd_pass"], "median_s": medians,
                            "akl_ratio": medians["kd_pass"] / medians["kd_pass_no_akl"],
                            "no_akl_over_floor": medians["kd_pass_no_akl"] / medians["floor"]}
    return summary


def against_benchmark(args):
    """This tree's kd_pass (with and without the AKL search) against the losses.py of git revision
    --against, on the peaked and the flat teacher, in alternating rounds: now / before per row."""
    shown = subprocess.run(["git", "-C", ROOT, "show", f"{args.against}:losses.py"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise ValueError(f"--against {args.against}: {shown.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "losses.py")
        with open(before, "w") as f:
            f.write(shown.stdout)
        runs = {f"{v} {t} {when}": (v, t, before if when == "before" else None)
                for t in ("peaked", "flat") for v in ("kd_pass", "kd_pass_no_akl") for when in ("now", "before")}
        medians, _ = alternating(args, runs)
    return {key[:-4]: {"now_s": medians[key], "before_s": medians[key[:-3] + "before"],
                       "ratio": medians[key] / medians[key[:-3] + "before"]} for key in medians if key.endswith(" now")}


STEP_VARIANTS = "fkl,arkd,jsd:0.5,tvd,skl:0.1,srkl:0.1,fkl --sgo_ratio 0.25 --max_new_tokens 32"


def step_benchmark(args):
    """Median optimizer-step time of arkd.py for each variant of --step_variants (a strategy and any
    further flags) over --strategy fkl, measured in alternating subprocesses on the same data, models
    and batches."""
    import data
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = data.write_synthetic(os.path.join(tmp, "data"))
        texts = [r["prompt"] + r["references"][0] for r in data.load_records("dolly_train", data_dir)]
        plumbing.train_tokenizer(texts).save_pretrained(os.path.join(tmp, "tok"))
        for role, spec in (("teacher", args.teacher_size), ("student", args.student_size)):
            layers, width = map(int, spec.split(","))
            plumbing.tiny_model(os.path.join(tmp, "tok"), os.path.join(tmp, role), width, layers, n_head=max(1, width // 64))
        from transformers import AutoModelForCausalLM
        params = {role: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(os.path.join(tmp, role)).parameters())
                  for role in ("teacher", "student")}
        variants = dict.fromkeys(["fkl", "arkd"] + getattr(args, "step_variants", STEP_VARIANTS).split(","))
        times, tokens = ({v: [] for v in variants} for _ in range(2))
        for round_ in range(args.repeats):
            for index, variant in enumerate(times):
                out = os.path.join(tmp, f"{index}-{round_}")
                strategy, *flags = variant.split()
                cmd = [sys.executable, os.path.join(ROOT, "arkd.py"),
                       "--method", "kd", "--strategy", strategy, *flags, "--teacher", os.path.join(tmp, "teacher"),
                       "--student", os.path.join(tmp, "student"), "--data_dir", data_dir, "--out", out,
                       "--max_steps", str(args.steps), "--batch_size", str(args.step_batch), "--grad_accum", "4",
                       "--eval_every", "0", "--val_examples", "1", "--max_new_tokens", "1", "--warmup_ratio", "0"]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"bench: arkd.py --strategy {variant} failed:\n{done.stderr[-2000:]}")
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f if '"step_seconds"' in line]
                times[variant] += [r["step_seconds"] for r in rows[3:]]      # the first steps warm up
                tokens[variant] += [r["tokens_per_second"] for r in rows[3:]]
    medians = {s: statistics.median(t) for s, t in times.items()}
    return {"teacher_params": params["teacher"], "student_params": params["student"],
            "size_ratio": params["teacher"] / params["student"], "grad_accum": 4, "batch": args.step_batch,
            "median_step_s": medians, "step_time_ratio": medians["arkd"] / medians["fkl"],
            "ratio_to_fkl": {v: m / medians["fkl"] for v, m in medians.items()},
            "tokens_per_second": {s: statistics.median(t) for s, t in tokens.items()},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"}


def print_step(summary):
    print(f"teacher {summary['teacher_params'] / 1e6:.2f}M params, student {summary['student_params'] / 1e6:.2f}M "
          f"({summary['size_ratio']:.1f}x), accumulation 4, {summary['device']}")
    medians = summary["median_step_s"]
    print(f"median step: fkl {medians['fkl'] * 1e3:.1f} ms, arkd {medians['arkd'] * 1e3:.1f} ms; ratio "
          f"{summary['step_time_ratio']:.3f} (baseline: the FKL step)")
    print("every variant's step / the FKL step: " + ", ".join(f"{v} {r:.3f}x" for v, r in summary["ratio_to_fkl"].items()))


class RandomTokenizer:
    """What generation needs of a tokenizer, for a random GPT-2 (EOS = pad = 50256)."""
    pad_token_id = eos_token_id = 50256

    @staticmethod
    def batch_decode(ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids]


def random_gpt2(layers, width, device="cpu"):
    """(a random GPT-2 of the given shape over 50257 tokens in eval mode, its tokenizer stand-in, 100-token
    prompt ids for it): no EOS stops such a model early, the worst case for generation."""
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=max(1, width // 64),
                                       bos_token_id=50256, eos_token_id=50256)).to(device).eval()
    return model, RandomTokenizer(), lambda n: torch.randint(0, 50000, (n, 100)).tolist()


def generation_speed(layers, width, new_tokens, prompts=64, batch=32):
    """Prompts per second of evaluate.generate for random_gpt2, `new_tokens` sampled."""
    import evaluate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, prompt_ids = random_gpt2(layers, width, device)
    start_memory_window(device)
    start = time.perf_counter()
    evaluate.generate(model, tokenizer, prompt_ids(prompts), 10, batch, new_tokens, progress=False)
    seconds = time.perf_counter() - start
    return {"layers": layers, "width": width, "new_tokens": new_tokens, "prompts": prompts, "batch": batch,
            "prompts_per_second": prompts / seconds,
            "peak_bytes": peak_memory_bytes(device)}


def sgo_benchmark(args):
    """Seconds per generated token of one step's 8 student-generated responses (arkd.on_policy_responses)
    batched (--gen_batch_size 8) against one example at a time (1), in alternating rounds, for random_gpt2
    of --student_size on the CPU, 32 new tokens."""
    import arkd
    torch.manual_seed(0)
    model, tokenizer, prompt_ids = random_gpt2(*map(int, args.student_size.split(",")))
    examples = [{"prompt_ids": p} for p in prompt_ids(8)]
    per_token = {1: [], 8: []}
    for round_ in range(args.repeats):
        for size, times in per_token.items():
            settings = argparse.Namespace(max_new_tokens=32, max_total=512, seed=round_, gen_batch_size=size)
            start = time.perf_counter()
            responses = arkd.on_policy_responses(model, tokenizer, examples, settings, step=0)
            times.append((time.perf_counter() - start) / sum(map(len, responses)))
    medians = {size: statistics.median(times) for size, times in per_token.items()}
    return {"seconds_per_token": medians, "speedup": medians[1] / medians[8], "student": args.student_size,
            "device": f"CPU, {torch.get_num_threads()} thread(s)"}


def gpu_check(args):
    """The GPU checklist in one command: kd_pass against the unfused formulations at real sizes (fp32 and
    bf16), the ARKD step against the FKL step at GPT-2 120M / XL shapes, training tokens per second,
    evaluation prompts per second at 256 new tokens, peak memory of each; OUT/gpu_check.json and .md.
    Without CUDA: the same checks at reduced sizes; --variants picks the kd loss formulations (default all)."""
    cuda = torch.cuda.is_available()
    n, vocab = (4096, 50257) if cuda else (64, 2048)
    steps = dict(teacher_size="48,1600", student_size="12,768", step_batch=8, steps=13) if cuda else \
        dict(teacher_size="2,128", student_size="1,64", step_batch=4, steps=5)
    report = {"device": torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s) (reduced sizes)",
              "kd_pass": {}, "generation": None, "step": None}
    for dtype in ("fp32", "bf16"):
        report["kd_pass"][dtype] = compare_variants(argparse.Namespace(**{**vars(args), "n": n, "vocab": vocab, "dtype": dtype,
                                                                          "device": "cuda" if cuda else "cpu"}))
    report["step"] = step_benchmark(argparse.Namespace(**{**vars(args), **steps, "repeats": 1, "step_variants": "fkl"}))
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
    parser.add_argument("--teacher", default="peaked", choices=tuple(TEACHERS), help="the teacher's logits: peaked "
                        "(a trained LM's), flat (the AKL head search's hard case), onehot")
    parser.add_argument("--akl", action="store_true", help="kd_pass with AKL over kd_pass without it, and the floor, on "
                        "every teacher, in alternating rounds")
    parser.add_argument("--against", help="this tree's kd_pass against the losses.py of this git revision, alternating")
    parser.add_argument("--losses", help=argparse.SUPPRESS)                  # set in the child: a losses.py to time
    parser.add_argument("--gpu_check", action="store_true", help="the GPU checklist (reduced sizes without CUDA); "
                        "writes --out/gpu_check.json and .md")
    parser.add_argument("--step", action="store_true", help="step benchmark: ARKD step over FKL step in arkd.py")
    parser.add_argument("--sgo", action="store_true", help="a step's 8 student-generated responses batched against "
                        "one at a time (--student_size, --repeats)")
    parser.add_argument("--steps", type=int, default=43, help="--step: optimizer steps per run")
    parser.add_argument("--step_variants", default=STEP_VARIANTS, help="--step: comma-separated strategies with any "
                        "further arkd.py flags, each timed against fkl")
    parser.add_argument("--teacher_size", default="3,240", help="--step: teacher layers,width")
    parser.add_argument("--student_size", default="2,128", help="--step: student layers,width")
    parser.add_argument("--step_batch", type=int, default=4, help="--step: sequences per micro-batch")
    parser.add_argument("--out", default="runs/bench", help="--gpu_check: output directory")
    parser.add_argument("--variant", help=argparse.SUPPRESS)                 # set in the child
    args = parser.parse_args()
    if args.variant:
        return run_variant(args)
    if args.akl:
        summary = akl_benchmark(args)
        if args.json:
            return print(json.dumps(summary, indent=1))
        print(f"N={args.n} V={args.vocab} {args.dtype}, {args.threads} thread(s), median of {args.repeats} alternating rounds")
        for teacher, r in summary.items():
            m = r["median_s"]
            print(f"{teacher} teacher ({r['teacher_entropy']:.1f} nats): kd_pass {m['kd_pass']:.3f} s, without AKL "
                  f"{m['kd_pass_no_akl']:.3f} s, floor {m['floor']:.3f} s; AKL {r['akl_ratio']:.3f}x (baseline: "
                  f"kd_pass(akl=False)); without AKL {r['no_akl_over_floor']:.2f}x (baseline: the floor)")
        return
    if args.against:
        summary = against_benchmark(args)
        if args.json:
            return print(json.dumps(summary, indent=1))
        for name, r in summary.items():
            print(f"{name}: now {r['now_s']:.3f} s, {args.against} {r['before_s']:.3f} s: {r['ratio']:.3f}x "
                  f"(baseline: {args.against}'s losses.py)")
        return
    if args.step:
        summary = step_benchmark(args)
        return print(json.dumps(summary, indent=1)) if args.json else print_step(summary)
    if args.gpu_check:
        return gpu_check(args)
    if args.sgo:
        torch.set_num_threads(args.threads)
        s = sgo_benchmark(args)
        return print(json.dumps(s, indent=1) if args.json else f"student-generated responses, 8 a step ({s['device']}): "
                     f"{1e3 * s['seconds_per_token'][8]:.2f} ms per generated token batched (--gen_batch_size 8), "
                     f"{1e3 * s['seconds_per_token'][1]:.2f} one at a time: {s['speedup']:.2f}x fewer seconds per token "
                     f"(baseline: one example at a time)")
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
    floor = results["floor"]["median_s"] if "floor" in results else float("nan")
    print(f"{'variant':<16} {'time s':>8} {'x naive':>8} {'x floor':>8} {'peak extra MiB':>15} {'x naive':>8}")
    for name, r in results.items():
        print(f"{name:<16} {r['median_s']:8.3f} {r['time_ratio']:8.3f} {r['median_s'] / floor:8.2f} "
              f"{r['peak_extra_bytes'] / 2**20:15.1f} {r['peak_memory_ratio'] or float('nan'):8.3f}")
    if "kd_pass" in results:
        print(f"teacher entropy {results['kd_pass']['teacher_entropy']:.1f} nats; the AKL head is the top-1 alone in "
              f"{100 * results['kd_pass']['top1_resolved_share']:.0f}% of the rows (the rest: the bin search)")
    for peer in REFERENCE_ONLY:
        if f"kd_pass_over_{peer}" in summary:
            r = summary[f"kd_pass_over_{peer}"]
            print(f"kd_pass (all policy statistics) over {peer} (its loss only): time {r['time']:.3f}x, peak memory {r['memory']:.3f}x")


if __name__ == "__main__":
    cli(main, "bench")
