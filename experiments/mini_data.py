"""The miniature's data (run.sh mini): a subset of the real MiniLLM data sized for a CPU, optionally
in the teacher's chat template (Choices M2, M3 of docs/method.md).

    python -m experiments.mini_data --source MINILLM_DATA --out runs/mini/data --tokenizer TEACHER --template chat
"""
import argparse
import logging
import os
import sys

from data import dataset_file, hub_path, load_records, read_jsonl, record_line
from plumbing import load_tokenizer, write_atomic

log = logging.getLogger("data")
TEST_SETS = ("dollyeval", "selfinst", "vicunaeval")


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
    parser.add_argument("--source", required=True, help="the MiniLLM data (Hub layout)")
    parser.add_argument("--out", required=True, help="directory to write into")
    parser.add_argument("--tokenizer", required=True, help="the model whose tokenizer measures the lengths")
    for name, default in (("train", 256), ("dev", 16), ("test", 50), ("max_prompt", 128), ("max_total", 192)):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{name} (see write_mini)")
    parser.add_argument("--template", default="minillm", choices=("minillm", "chat"), help="the prompt template")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        print(write_mini(args.source, args.out, load_tokenizer(args.tokenizer), args.train, args.dev, args.test,
                         args.max_prompt, args.max_total, args.template))
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.mini_data: {err}")


if __name__ == "__main__":
    main()
