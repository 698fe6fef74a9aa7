"""Evaluation: sampling, Rouge-L, exact match and BERTScore per seed, reports, heatmaps and run plots.

Section 6 of docs/method.md, as a library (arkd.py validates and samples SeqKD data with it) and a CLI:

    python evaluate.py score --model PATH --data_dir DIR --datasets dollyeval,selfinst,vicunaeval,sni,unni \\
        --seeds 10,20,30,40,50 --out DIR
    torchrun --nproc_per_node=N evaluate.py ...            # the same predictions, N times faster
    python evaluate.py report --runs DIR [DIR ...] --out DIR
    python evaluate.py plot RUN          # alpha.png and reward.png of a KD run (the paper's figures 5, 6)

Choices E1-E5 (docs/method.md 6), marked where made: seeds by batch (E1), exact match normalised (E2),
the best of several references (E3), an empty prediction scores 0 (E4), sample std over seeds (E5).
"""
import argparse
import json
import logging
import math
import os
import statistics
import string
import sys
import textwrap
import time

import torch
import torch.distributed as dist

import data
import plumbing
from plumbing import barrier, print0, world, write_atomic

log = logging.getLogger("evaluate")

GENERATION = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, no_repeat_ngram_size=6)
GREEDY = dict(do_sample=False, no_repeat_ngram_size=6)     # score --greedy: the argmax, beside sampling at temperature 1
MAX_NEW_TOKENS = 256
METRICS = ("rougeL", "exact_match", "bertscore_f1")


# ----------------------------------------------------------------------------------------------
# Sampling


def generate(model, tokenizer, prompt_ids, seed, batch_size=16, max_new_tokens=MAX_NEW_TOKENS, progress=True,
             generation=GENERATION):
    """Sampled responses (strings, in the order of prompt_ids) with the settings of docs/method.md 6."""
    responses = generate_ids(model, tokenizer, prompt_ids, seed, batch_size, max_new_tokens, progress, generation)
    return [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids, seed, batch_size=16, max_new_tokens=MAX_NEW_TOKENS, progress=True,
                 generation=GENERATION):
    """Sampled responses (token lists, each cut after its first EOS by position, the EOS kept). Whole
    batches are sharded over ranks, the predictions gathered on every rank. Under FSDP2 every forward is a
    collective: each rank takes as many batches (the last again) and runs until all are done (synced_gpus)."""
    from torch.distributed.fsdp import FSDPModule
    from tqdm import tqdm
    rank, world_size = world()
    device = next(model.parameters()).device
    batches = [prompt_ids[i:i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    synced = world_size > 1 and isinstance(model, FSDPModule)
    slots = -(-len(batches) // world_size) * world_size if synced else len(batches)
    mine = {}
    bar = tqdm(range(rank, slots, world_size), desc=f"generate seed {seed}", unit="batch",
               disable=not progress or rank != 0, leave=False)
    for b in bar:
        prompts = batches[min(b, len(batches) - 1)]
        batch = {k: v.to(device) for k, v in data.collate_prompts(prompts, tokenizer.pad_token_id).items()}
        # Seeded by batch, whatever the rank (Choice E1); the caller's random state (its dropout) left alone.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + b)
            out = model.generate(**batch, **generation, max_new_tokens=max_new_tokens, synced_gpus=synced,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if b < len(batches):            # after its EOS a row holds padding (GPT-2's pad is its EOS: cut by position)
            rows = out[:, batch["input_ids"].shape[1]:].tolist()
            mine[b] = [r[:r.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in r else r for r in rows]
    if world_size > 1:       # every rank needs every prediction, in dataset order
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = {b: preds for part in parts for b, preds in part.items()}
    return [p for b in range(len(batches)) for p in mine[b]]


# ----------------------------------------------------------------------------------------------
# Metrics


_ROUGE = None


def rouge_l(prediction, references):
    """max over references of Rouge-L F-measure (rouge_score, stemmer on) x 100 (Choice E3)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not prediction.strip():
        return 0.0                                          # Choice E4
    return 100 * max(_ROUGE.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def exact_match(prediction, references):
    """100 if the prediction equals a reference lower-cased, without punctuation, whitespace collapsed (E2), else 0."""
    normalise = lambda text: " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())  # noqa: E731
    return 100.0 * any(normalise(prediction) == normalise(ref) for ref in references) if prediction.strip() else 0.0


class BERTScore:
    """BERTScore F1 x 100, the model loaded once: a bert_score name (roberta-large, layer 17) or a local
    path with num_layers; idf and baseline rescaling only when asked; `settings` go with every result."""

    def __init__(self, model="roberta-large", num_layers=None, batch_size=64, idf=False,
                 rescale_with_baseline=False, device=None):
        model = str(model)
        if os.path.sep in model and not os.path.isdir(model):
            raise FileNotFoundError(f"BERTScore model {model!r}: no such directory")
        if os.path.isdir(model) and num_layers is None:
            raise ValueError(f"BERTScore model {model!r} is a local path: give its num_layers")
        self.settings = {"model": model, "num_layers": num_layers, "idf": idf,
                         "rescale_with_baseline": rescale_with_baseline, "batch_size": batch_size}
        self._scorer = None
        self._device = device

    def __call__(self, predictions, references):
        """predictions [n] strings, references [n] lists of strings -> [n] F1 x 100."""
        keep = [i for i, p in enumerate(predictions) if p.strip()]     # Choice E4
        scores = [0.0] * len(predictions)
        if not keep:
            return scores
        if self._scorer is None:
            from bert_score import BERTScorer
            s = self.settings
            self._scorer = BERTScorer(model_type=s["model"], num_layers=s["num_layers"], idf=s["idf"],
                                      rescale_with_baseline=s["rescale_with_baseline"],
                                      batch_size=s["batch_size"], lang="en", device=self._device)
        if self.settings["idf"]:
            self._scorer.compute_idf([r for refs in references for r in refs])
        _, _, f1 = self._scorer.score([predictions[i] for i in keep], [references[i] for i in keep])
        for i, value in zip(keep, f1.tolist()):
            scores[i] = 100 * value
        return scores


def mean_std(values):
    """(mean, sample std) (Choice E5)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# One model on many sets and seeds, resumable


def evaluate_dataset(model, tokenizer, name, records, seed, out_dir, batch_size, max_new_tokens,
                     bertscore=None, limits=(data.MAX_PROMPT_TOKENS, data.MAX_TOTAL_TOKENS), generation=GENERATION):
    """Generates and scores one (dataset, seed); writes predictions jsonl and scores json. Skips the pair when
    its scores file exists, so an interrupted evaluation resumes."""
    rank, _ = world()
    scores_path = os.path.join(out_dir, name, f"seed{seed}.json")
    if os.path.exists(scores_path):
        with open(scores_path) as f:
            return json.load(f)
    examples, counts = data.encode_records(tokenizer, records, name, *limits)
    start, prompts = time.perf_counter(), [e["prompt_ids"] for e in examples]
    predictions = generate(model, tokenizer, prompts, seed, batch_size, max_new_tokens, generation=generation)
    elapsed = time.perf_counter() - start
    kept = [records[e["index"]] for e in examples]
    result = None
    if rank == 0:
        references = [r["references"] for r in kept]
        per_example = {"rougeL": [rouge_l(p, refs) for p, refs in zip(predictions, references)],
                       "exact_match": [exact_match(p, refs) for p, refs in zip(predictions, references)]}
        if bertscore is not None:
            per_example["bertscore_f1"] = bertscore(predictions, references)
        lines = [json.dumps({"prompt": r["prompt"], "references": r["references"], "prediction": p,
                             "seed": seed, **{m: v[i] for m, v in per_example.items()}})
                 for i, (r, p) in enumerate(zip(kept, predictions))]
        write_atomic(os.path.join(out_dir, name, f"seed{seed}.jsonl"), "\n".join(lines) + "\n")
        result = {"dataset": name, "seed": seed, "n": len(predictions), **counts,
                  **{m: statistics.fmean(v) for m, v in per_example.items()},
                  "prompts_per_second": len(predictions) / elapsed,
                  "bertscore": bertscore.settings if bertscore is not None else None}
        write_atomic(scores_path, json.dumps(result, indent=1))
        print0(f"{name} seed {seed}: Rouge-L {result['rougeL']:.2f}" + (f" BERTScore {result['bertscore_f1']:.2f}" if
               bertscore else "") + f" ({len(predictions)} prompts, {result['prompts_per_second']:.3g} prompts/s)")
    barrier()
    return result


def summarise(results):
    """{dataset: {metric: {mean, std, seeds}}} from per-(dataset, seed) results."""
    summary = {}
    for r in results:
        for metric in METRICS:
            if metric in r:
                entry = summary.setdefault(r["dataset"], {}).setdefault(metric, {"seeds": {}})
                entry["seeds"][str(r["seed"])] = r[metric]
    for metrics in summary.values():
        for entry in metrics.values():
            entry["mean"], entry["std"] = mean_std(list(entry["seeds"].values()))
    return summary


def run_evaluation(args, device):
    rank, _ = world()
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in data.DATASETS]
    if unknown:
        raise ValueError(f"--datasets: unknown {unknown}; known: {', '.join(data.DATASETS)}")
    seeds, generation = [int(s) for s in args.seeds.split(",")], GREEDY if args.greedy else GENERATION
    records = {name: data.load_records(name, args.data_dir) for name in datasets}   # fail before work
    tokenizer = plumbing.load_tokenizer(args.model)
    model = plumbing.load_model(args.model, device, torch.bfloat16 if args.bf16 else torch.float32, len(tokenizer)).eval()
    bertscore = None if args.no_bertscore else BERTScore(args.bertscore_model, args.bertscore_layers,
                                                          args.bertscore_batch_size, args.bertscore_idf,
                                                          args.bertscore_rescale, device=str(device))
    results = [evaluate_dataset(model, tokenizer, name, records[name], seed, args.out, args.batch_size,
                                args.max_new_tokens, bertscore, (args.max_prompt, args.max_total), generation)
               for name in datasets for seed in seeds]
    if rank == 0:
        summary = {"label": args.label or os.path.basename(os.path.normpath(args.model)),
                   "model": args.model, "generation": {**generation, "max_new_tokens": args.max_new_tokens,
                                                       "batch_size": args.batch_size},
                   "bertscore": bertscore.settings if bertscore else None, "results": summarise(results)}
        write_atomic(os.path.join(args.out, "results.json"), json.dumps(summary, indent=1))
        for name, metrics in summary["results"].items():
            print0(f"{name}: " + ", ".join(f"{m} {v['mean']:.2f} +- {v['std']:.2f}" for m, v in metrics.items()))
    return results


# ----------------------------------------------------------------------------------------------
# Reports: many runs -> results.md, results.json, heatmaps


def new_figure(width, height, columns=1):
    """(figure, axes) drawn off screen: matplotlib's Agg backend needs no display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, columns, figsize=(width, height))


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(values, row_labels, col_labels, title, path, reference="teacher"):
    """strategy x dataset heatmap (the paper's figures 3, 4 and 7) as a PNG. Colours are scaled per column over
    the students, so that they differ visibly even when the teacher is far ahead; the `reference` row is grey,
    outside the colour scale, with its numbers. NaN cells are left blank."""
    grid = torch.tensor(values, dtype=torch.float64).reshape(len(row_labels), len(col_labels))
    students = torch.tensor([label != reference for label in row_labels])
    scaled = torch.full_like(grid, float("nan"))
    for j in range(grid.shape[1]):
        column = grid[students, j]
        column = column[~column.isnan()]
        if len(column):
            low, high = float(column.min()), float(column.max())
            scaled[students, j] = (grid[students, j] - low) / (high - low) if high > low else 0.5
    fig, ax = new_figure(2.2 + 1.3 * len(col_labels), 1.2 + 0.45 * len(row_labels))
    ax.set_facecolor("0.85")                 # NaN cells are transparent: the reference row shows grey
    image = ax.imshow(scaled.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                colour = "black" if not students[i] or scaled[i, j] > 0.6 else "white"
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.colorbar(image, ax=ax, label="per column: worst -> best student")
    save_figure(fig, path)


def report(run_dirs, out_dir, title="Results"):
    """Gathers the results.json of several runs into results.md, results.json and heatmaps."""
    runs = {}
    for run in run_dirs:
        path = os.path.join(run, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"report: {path} does not exist (run evaluate.py for {run} first)")
        with open(path) as f:
            summary = json.load(f)
        runs[summary["label"]] = summary["results"]
    datasets = [d for d in data.DATASETS if any(d in r for r in runs.values())]
    datasets += sorted({d for r in runs.values() for d in r} - set(datasets))
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# {title}", "", "Mean +- sample std over sampling seeds (one seed: its value alone), x 100.", ""]
    for metric, metric_title in (("rougeL", "Rouge-L"), ("bertscore_f1", "BERTScore F1"), ("exact_match", "Exact match")):
        if not any(metric in m for r in runs.values() for m in r.values()):
            continue
        lines += [f"## {metric_title}", "", "| run | " + " | ".join(datasets) + " |",
                  "| --- |" + " --- |" * len(datasets)]
        grid = []
        for label, results in runs.items():
            cells = [results.get(d, {}).get(metric) for d in datasets]
            grid.append([c["mean"] if c else float("nan") for c in cells])
            lines.append(f"| {label} | " + " | ".join("-" if not c else f"{c['mean']:.2f}" + (
                f" +- {c['std']:.2f}" if len(c["seeds"]) > 1 else "") for c in cells) + " |")
        lines.append("")
        if metric != "exact_match":
            heatmap(grid, list(runs), datasets, f"{metric_title}: {title}" if title != "Results" else metric_title,
                    os.path.join(out_dir, f"{metric}_heatmap.png"))
    write_atomic(os.path.join(out_dir, "results.md"), "\n".join(lines))
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(runs, indent=1))
    return runs


def read_metrics(run_dir):
    """The KD training rows (those with FKL) of RUN_DIR/metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"plot: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "fkl" in r]


def plot_run(run_dir):
    """The paper's figures 5 (alpha trajectory) and 6 (reward with FKL and RKL) as RUN_DIR/alpha.png
    and RUN_DIR/reward.png, from its metrics.jsonl."""
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    fig, ax = new_figure(7, 3.5)
    ax.plot(steps, [r.get("alpha") for r in rows], lw=0.8, label="alpha (FKL weight)")
    if any(r.get("beta_a") for r in rows):
        ax.plot(steps, [r["beta_a"] / (r["beta_a"] + r["beta_b"]) if r.get("beta_a") else None for r in rows],
                lw=1.5, label="policy mean a / (a + b)")
    ax.set(xlabel="step", ylabel="alpha", ylim=(0, 1), title="alpha trajectory")
    ax.legend()
    save_figure(fig, os.path.join(run_dir, "alpha.png"))
    fig, ax = new_figure(7, 3.5)
    ax.plot(steps, [r.get("fkl") for r in rows], label="FKL")
    ax.plot(steps, [r.get("rkl") for r in rows], label="RKL")
    ax.set(xlabel="step", ylabel="divergence", title="reward, FKL and RKL")
    rewarded = [(r["step"], r["reward"]) for r in rows if r.get("reward") is not None]
    if rewarded:
        twin = ax.twinx()
        twin.plot(*zip(*rewarded), color="tab:green", lw=0.8, label="reward")
        twin.set_ylabel("reward")
        twin.legend(loc="upper center")
    ax.legend()
    save_figure(fig, os.path.join(run_dir, "reward.png"))
    return [os.path.join(run_dir, "alpha.png"), os.path.join(run_dir, "reward.png")]


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a causal LM on the MiniLLM sets, report runs, plot a run.")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="sample and score a model on the evaluation sets")
    score.add_argument("--model", required=True, help="model directory (save_pretrained) or Hub id")
    score.add_argument("--data_dir", default=None, help="MiniLLM data: a Hub-layout folder, a folder holding a set's "
                       "file, or one JSONL file (every set reads it); default: the Hub")
    score.add_argument("--max_prompt", type=int, default=data.MAX_PROMPT_TOKENS, help="longer prompts are dropped (counted)")
    score.add_argument("--max_total", type=int, default=data.MAX_TOTAL_TOKENS, help="prompt + reference cut at this")
    score.add_argument("--datasets", default=",".join(data.EVAL_SETS), help="comma-separated, of " + ", ".join(data.DATASETS))
    score.add_argument("--seeds", default="10,20,30,40,50", help="comma-separated sampling seeds")
    score.add_argument("--out", required=True, help="output directory (resumes what is there)")
    score.add_argument("--label", default=None, help="name of this run in reports (default: model directory name)")
    # generation
    score.add_argument("--batch_size", type=int, default=16, help="prompts per generation batch (fixes the results)")
    score.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="tokens to sample per prompt")
    score.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (CUDA)")
    score.add_argument("--greedy", action="store_true", help="greedy decoding in place of sampling at temperature 1")
    # BERTScore
    score.add_argument("--bertscore_model", default="roberta-large", help="bert_score model name or local path")
    score.add_argument("--bertscore_layers", type=int, default=None, help="layer to use (required for a local path)")
    score.add_argument("--bertscore_batch_size", type=int, default=64, help="BERTScore batch size")
    score.add_argument("--bertscore_idf", action="store_true", help="idf weighting (off by default)")
    score.add_argument("--bertscore_rescale", action="store_true", help="rescale with baseline (off by default)")
    score.add_argument("--no_bertscore", action="store_true", help="skip BERTScore")
    report_ = commands.add_parser("report", help="gather evaluated runs into tables and heatmaps")
    report_.add_argument("--runs", nargs="+", required=True, help="run directories holding results.json")
    report_.add_argument("--out", required=True, help="where results.md, results.json and PNGs go")
    report_.add_argument("--title", default="Results", help="heading of results.md and the heatmaps")
    plot = commands.add_parser("plot", help="a KD run's alpha.png and reward.png (the paper's figures 5, 6)")
    plot.add_argument("run", help="the run directory (its metrics.jsonl)")
    args = parser.parse_args(argv)
    if args.command == "score" and (args.batch_size < 1 or args.max_new_tokens < 1 or args.max_prompt < 1):
        parser.error("--batch_size, --max_new_tokens and --max_prompt must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == "report":
        report(args.runs, args.out, args.title)
        return print(f"wrote {os.path.join(args.out, 'results.md')}")
    if args.command == "plot":
        return print("wrote " + " and ".join(plot_run(args.run)))
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    _, _, device = plumbing.init_processes()
    try:
        run_evaluation(args, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:    # bad settings or files: the message, not a traceback
        sys.exit(f"evaluate.py: {err}")
