"""MiniLLM-format instruction data: the sets, the prompt template, tokenisation, batching, the toy task.

Section 5 of docs/method.md (choices D1-D4, marked where made): the protocol MiniLLM, DistiLLM, GKD and
ARKD share. JSON lines with `instruction`, `input`, `output` (a string, or a list of references) and
usually `prompt`, from a local directory in the Hub layout (DATA_DIR/dolly/raw.jsonl, ...) or the Hub.

    python data.py download --out DIR      # the MiniLLM sets from the Hub
    python data.py synthetic --out DIR     # the offline toy task in the same layout, and DIR/tokenizer
"""
import argparse
import json
import logging
import os
import random

import torch

from plumbing import train_tokenizer, write_atomic

log = logging.getLogger("data")

PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes the "
                     "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")
MAX_PROMPT_TOKENS, MAX_TOTAL_TOKENS = 256, 512
IGNORE_INDEX = -100

# name: (Hub dataset repo, file inside it, first record, end record or None)   (Choice D3)
DATASETS = {
    "dolly_train": ("MiniLLM/dolly", "raw.jsonl", 1000, None),
    "dolly_dev": ("MiniLLM/dolly", "raw.jsonl", 0, 1000),
    "dollyeval": ("MiniLLM/dolly", "valid.jsonl", 0, None),
    "selfinst": ("MiniLLM/self-inst", "valid.jsonl", 0, 242),
    "vicunaeval": ("MiniLLM/Vicuna", "valid.jsonl", 0, None),
    "sni": ("MiniLLM/sinst", "11_/valid.jsonl", 0, None),
    "unni": ("MiniLLM/uinst", "11_/valid.jsonl", 0, 10000),
}
EVAL_SETS = ("dollyeval", "selfinst", "vicunaeval", "sni", "unni")


# ----------------------------------------------------------------------------------------------
# Records


def build_prompt(instruction, input_text=""):
    """The MiniLLM / Alpaca template, with or without an input."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def read_jsonl(path):
    """Records of a MiniLLM-format file: {instruction, input, references, prompt} dicts. A bad line (not UTF-8,
    not JSON, not an object, a field of a wrong type, a lone surrogate) is a ValueError naming file and line;
    blank lines are skipped; an empty file is an error. The prompt: its `prompt` field, else the template (D4)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a file")
    records = []
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not valid UTF-8 (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except (ValueError, RecursionError) as err:      # also too many digits, too deep
                raise ValueError(f"{where}: not valid JSON ({str(err)[:120]})") from None
            records.append(_record(raw, where))
    if not records:
        raise ValueError(f"{path}: the file holds no records")
    return records


def _record(raw, where):
    """One checked record from a parsed JSON line (see read_jsonl)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for field in ("instruction", "output"):
        if field not in raw:
            raise ValueError(f"{where}: record has no '{field}' field")
    for field, optional in (("instruction", False), ("input", True), ("prompt", True)):
        if not isinstance(raw.get(field), str) and not (optional and raw.get(field) is None):
            raise ValueError(f"{where}: '{field}' must be a string{' (or absent)' if optional else ''}, "
                             f"got {type(raw.get(field)).__name__}")
    input_text, prompt, output = raw.get("input"), raw.get("prompt"), raw["output"]
    references = [output] if isinstance(output, str) else output
    if not (isinstance(references, list) and references and all(isinstance(r, str) for r in references)):
        raise ValueError(f"{where}: 'output' must be a string or a non-empty list of strings")
    for text in [raw["instruction"], input_text or "", prompt or ""] + references:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: a field holds a lone surrogate escape, not valid Unicode") from None
    input_text = input_text or ""
    return {"instruction": raw["instruction"], "input": input_text, "references": references,
            "prompt": build_prompt(raw["instruction"], input_text) if prompt is None else prompt}


def hub_path(name):
    """(Hub dataset repo, its file's path in a local copy: <repo name>/<file>) of dataset `name`."""
    repo, filename, _, _ = DATASETS[name]
    return repo, f"{repo.split('/')[1]}/{filename}"


def dataset_file(name, data_dir=None):
    """Path of the file behind dataset `name`: data_dir itself when it is a file (every set reads it),
    DATA_DIR/<repo name>/<file> (the Hub layout), DATA_DIR/<file> (a folder holding that file alone),
    else (no data_dir) a Hub download."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    repo, relative = hub_path(name)
    if data_dir is None:
        from huggingface_hub import hf_hub_download   # only this path needs the network
        return hf_hub_download(repo, DATASETS[name][1], repo_type="dataset")
    for path in (data_dir, os.path.join(data_dir, relative), os.path.join(data_dir, os.path.basename(relative))):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"dataset {name!r}: {data_dir} is not a JSONL file and holds neither {relative} (the Hub "
                            f"layout of {repo}) nor {os.path.basename(relative)}")


def download(data_dir):
    """Every MiniLLM file of DATASETS from the Hub into data_dir, in the layout dataset_file reads."""
    from huggingface_hub import hf_hub_download
    for repo, filename in sorted({(repo, filename) for repo, filename, _, _ in DATASETS.values()}):
        hf_hub_download(repo, filename, repo_type="dataset", local_dir=os.path.join(data_dir, repo.split("/")[1]))


def load_records(name, data_dir=None):
    """The records of one set (docs/method.md 5): a file given as data_dir whole, a MiniLLM file sliced as
    DATASETS says (dolly_train: raw.jsonl after its 1000 dev lines)."""
    path = dataset_file(name, data_dir)                  # names an unknown set first
    _, _, start, end = DATASETS[name]
    records = read_jsonl(path)
    if data_dir is not None and os.path.isfile(data_dir):
        return records
    if len(records) <= start:
        raise ValueError(f"dataset {name!r}: {path} holds {len(records)} records, and {name} starts after the first "
                         f"{start} (MiniLLM's dev split): give a file of training records as --data_dir FILE")
    return records[start:end]


# ----------------------------------------------------------------------------------------------
# Tokenisation and batching


def encode_records(tokenizer, records, name="data", max_prompt=MAX_PROMPT_TOKENS, max_total=MAX_TOTAL_TOKENS):
    """Tokenised examples {prompt_ids, input_ids, labels, index}: labels are -100 on the prompt.

    Drops records whose prompt exceeds max_prompt tokens and cuts responses at max_total
    (Choice D1); both counts are logged. The target is the first reference + EOS (Choice D2).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    examples, dropped, cut = [], 0, 0
    for index, record in enumerate(records):
        prompt_ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > max_prompt:
            dropped += 1
            continue
        response_ids = tokenizer(record["references"][0], add_special_tokens=False)["input_ids"]
        response_ids = response_ids + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(response_ids) > max_total:
            cut += 1
            response_ids = response_ids[:max_total - len(prompt_ids)]
        examples.append({"index": index, "prompt_ids": prompt_ids, "input_ids": prompt_ids + response_ids,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids})
    if dropped or cut:
        log.warning("%s: dropped %d of %d records whose prompt exceeds %d tokens; cut %d responses at "
                    "%d tokens", name, dropped, len(records), max_prompt, cut, max_total)
    if not examples:
        raise ValueError(f"{name}: every record's prompt exceeds {max_prompt} tokens")
    return examples, {"records": len(records), "dropped_long_prompt": dropped, "cut_long_response": cut}


def padded(rows, fill, left=False):
    """The lists `rows` as one long tensor [B, T], padded with `fill` on the right (on the left: left=True)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        start = width - len(r) if left else 0
        out[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate_train(examples, pad_id):
    """Right-padded training batch: input_ids, attention_mask [B, T]; labels -100 on padding."""
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": padded(ids, pad_id), "attention_mask": padded([[1] * len(i) for i in ids], 0),
            "labels": padded([e["labels"] for e in examples], IGNORE_INDEX)}


def collate_prompts(prompt_ids, pad_id):
    """Left-padded generation batch from lists of prompt ids: input_ids, attention_mask [B, T]."""
    return {"input_ids": padded(prompt_ids, pad_id, left=True),
            "attention_mask": padded([[1] * len(p) for p in prompt_ids], 0, left=True)}


def epoch_order(n, seed, epoch):
    """A permutation of range(n) for (seed, epoch), the same on every rank (each takes every world-size-th
    element, as DistributedSampler does): a resumed run can skip what it consumed."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


# ----------------------------------------------------------------------------------------------
# The offline toy task


SYNTHETIC_WORDS = ("apple", "river", "stone", "cloud", "green", "table", "light", "horse", "music",
                   "paper", "water", "night", "chair", "bread", "smile", "glass", "plant", "storm",
                   "tiger", "house")
SYNTHETIC_SPLITS = {   # file in the Hub layout: (records, tasks, list lengths)
    "dolly/raw.jsonl": (3000, ("reverse", "sort", "next", "first"), (2, 3, 4)),
    "dolly/valid.jsonl": (60, ("reverse", "sort", "next", "first"), (2, 3, 4)),
    "self-inst/valid.jsonl": (40, ("reverse", "sort"), (5,)),
    "Vicuna/valid.jsonl": (30, ("next", "first"), (5,)),
    "sinst/11_/valid.jsonl": (40, ("reverse", "sort", "next", "first"), (4,)),
    "uinst/11_/valid.jsonl": (40, ("sort", "first"), (2, 5)),
}


def synthetic_record(rng, task, length):
    """One toy instruction: word and number manipulations with an exact answer."""
    if task == "reverse":
        words = rng.sample(SYNTHETIC_WORDS, length)
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
                "output": " ".join(reversed(words))}
    if task == "sort":
        numbers = rng.sample(range(10, 100), length)
        return {"instruction": "Sort the numbers from smallest to largest.",
                "input": " ".join(map(str, numbers)), "output": " ".join(map(str, sorted(numbers)))}
    if task == "next":
        start = rng.randrange(10, 90)
        return {"instruction": f"Count up from {start}, giving {length} numbers.", "input": "",
                "output": " ".join(str(start + i) for i in range(length))}
    words = rng.sample(SYNTHETIC_WORDS, length)
    return {"instruction": "Repeat the first word three times.", "input": " ".join(words),
            "output": " ".join([words[0]] * 3)}


def write_synthetic(data_dir, seed=0, splits=SYNTHETIC_SPLITS, make_record=synthetic_record, tokenizer=False):
    """The toy task in the MiniLLM Hub layout under data_dir (tokenizer=True: a BPE trained on it in
    data_dir/tokenizer): the whole pipeline runs in minutes on a CPU with tiny models; its scores say
    nothing about the paper. The evaluation files add longer lists: partly out of distribution."""
    rng = random.Random(seed)
    for relative, (count, tasks, lengths) in splits.items():
        lines = []
        for _ in range(count):
            record = make_record(rng, rng.choice(tasks), rng.choice(lengths))
            record["prompt"] = build_prompt(record["instruction"], record["input"])
            lines.append(json.dumps(record) + "\n")
        write_atomic(os.path.join(data_dir, relative), "".join(lines))
    if tokenizer:
        texts = [r["prompt"] + r["references"][0] for r in load_records("dolly_train", data_dir)]
        train_tokenizer(texts).save_pretrained(os.path.join(data_dir, "tokenizer"))
    return data_dir


def record_line(record):
    """A record as a MiniLLM JSON line (its references as `output`: one string, or a list of several)."""
    references = record["references"]
    return json.dumps({"instruction": record["instruction"], "input": record["input"],
                       "output": references[0] if len(references) == 1 else references, "prompt": record["prompt"]})


def main(argv=None):
    parser = argparse.ArgumentParser(description="MiniLLM-format data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    download_ = commands.add_parser("download", help="the MiniLLM sets from the Hub into OUT")
    synthetic = commands.add_parser("synthetic", help="the offline toy task and a tokenizer trained on it (OUT/tokenizer)")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed of the toy data")
    for command in (download_, synthetic):
        command.add_argument("--out", required=True, help="directory to write into")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.out)
        else:
            write_synthetic(args.out, args.seed, tokenizer=True)
    except (ValueError, OSError) as err:
        raise SystemExit(f"data.py {args.command}: {err}")
    print(args.out)


if __name__ == "__main__":
    main()
