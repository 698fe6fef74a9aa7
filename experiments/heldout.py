"""The study's held-out metrics of one model against the teacher on the DollyEval file: FKL, RKL and
their sum J teacher-forced on the references, the student's CE, precision and coverage of sampled
responses, Rouge-L.

    python -m experiments.heldout --model M --teacher T --data_dir D --teacher_samples S.json --out DIR
"""
import argparse
import json
import os
import statistics
import sys

import torch

import data
import evaluate
import plumbing
from losses import IGNORE_INDEX, STAT_NAMES, kd_pass, next_token_targets, stat_means


def response_batches(examples, pad_id, batch_size=32):
    """(batch, next-token targets, mask of response tokens) for teacher forcing `examples`."""
    for lo in range(0, len(examples), batch_size):
        batch = data.collate_train(examples[lo:lo + batch_size], pad_id)
        targets = next_token_targets(batch.pop("labels"))
        yield batch, targets, targets != IGNORE_INDEX


@torch.no_grad()
def response_scores(student, teacher, examples, pad_id, vocab_size):
    """Token means over the responses of `examples`, teacher-forced in eval mode: FKL, RKL and the
    student's CE."""
    sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    for batch, targets, mask in response_batches(examples, pad_id):
        sums += kd_pass(student(**batch).logits, teacher(**batch).logits, mask, 1.0, vocab_size, target_ids=targets, akl=False).stats
    return stat_means(sums)


@torch.no_grad()
def response_ce(model, examples, pad_id, vocab_size):
    """One model's mean -log p per response token of `examples`, teacher-forced in eval mode."""
    total, tokens = 0.0, 0
    for batch, targets, mask in response_batches(examples, pad_id):
        logits = model(**batch).logits[..., :vocab_size][mask].float()
        total += float(torch.nn.functional.cross_entropy(logits, targets[mask], reduction="sum"))
        tokens += int(mask.sum())
    return total / max(tokens, 1)


def heldout_metrics(args):
    """The study's held-out metrics of one model against the teacher on the DollyEval file (written to
    OUT/heldout.json): teacher-forced on the references FKL, RKL, their sum J (the primary metric) and
    the student's CE; precision, the teacher's mean log-probability per token of the student's sampled
    responses; coverage, the student's of the teacher's (sampled once, kept in --teacher_samples);
    Rouge-L of the student's samples (secondary)."""
    tokenizer = plumbing.load_tokenizer(args.model)
    vocab = len(tokenizer)
    student, teacher = (plumbing.load_model(path, torch.device("cpu"), torch.float32, vocab).eval()
                        for path in (args.model, args.teacher))
    records = data.load_records("dollyeval", args.data_dir)
    examples, _ = data.encode_records(tokenizer, records, "dollyeval")
    prompts = [e["prompt_ids"] for e in examples]

    def sample(model):
        return evaluate.generate(model, tokenizer, prompts, args.heldout_seed, 64, args.max_new_tokens, progress=False)

    if not os.path.isfile(args.teacher_samples):
        plumbing.write_atomic(args.teacher_samples, json.dumps(sample(teacher)))
    with open(args.teacher_samples, encoding="utf-8") as f:
        teacher_samples = json.load(f)
    student_samples = sample(student)

    def ce_on(samples, model):                         # model's CE on the prompts with these responses
        as_records = [{**records[e["index"]], "references": [s]} for e, s in zip(examples, samples)]
        return response_ce(model, data.encode_records(tokenizer, as_records)[0], tokenizer.pad_token_id, vocab)

    refs = response_scores(student, teacher, examples, tokenizer.pad_token_id, vocab)
    result = {"model": args.model, "records": len(examples), "fkl": refs["fkl"], "rkl": refs["rkl"],
              "J": refs["fkl"] + refs["rkl"], "ce": refs["student_ce"],
              "precision": -ce_on(student_samples, teacher), "coverage": -ce_on(teacher_samples, student),
              "rougeL": statistics.fmean(evaluate.rouge_l(p, records[e["index"]]["references"])
                                         for p, e in zip(student_samples, examples))}
    os.makedirs(args.out, exist_ok=True)
    plumbing.write_atomic(os.path.join(args.out, "heldout.json"), json.dumps(result, indent=1))
    print(" ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model to measure")
    parser.add_argument("--teacher", required=True, help="the teacher")
    parser.add_argument("--data_dir", required=True, help="the data (its DollyEval file is the held-out set)")
    parser.add_argument("--teacher_samples", required=True, help="the teacher's samples (JSON; written if missing)")
    parser.add_argument("--out", required=True, help="output directory: heldout.json")
    parser.add_argument("--heldout_seed", type=int, default=10, help="sampling seed")
    parser.add_argument("--max_new_tokens", type=int, default=24, help="tokens sampled per prompt")
    return heldout_metrics(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.heldout: {err}")
