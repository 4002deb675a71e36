"""Load and save a Hugging Face Qwen2, Qwen3 or Llama folder: config.json, safetensors (one file or sharded),
tokenizer.json, and the tokenizer's config and chat template when the folder has them.

The model is built on the `meta` device (no memory), materialised empty on the target device in the
target dtype, and then filled one tensor at a time straight from the safetensors files, so the peak
stays near one copy of the model however large it is. Only safetensors and JSON are ever read: no
pickle is loaded.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minirl.errors import InputError
from minirl.model import Decoder
from minirl.model_config import ModelConfig
from minirl.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InputError(f"dtype {name!r} is unknown, expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: expected JSON with a 'weight_map' object ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: file not found (model weights must be safetensors)")
    return files


def open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a valid safetensors file ({e})") from None


def load_state_into(model: torch.nn.Module, files: list[Path], dtype: torch.dtype):
    """Copy tensors from safetensors files into the model's parameters, one at a time.

    Every problem (missing, unexpected, wrongly shaped tensors) is collected and reported in one error.
    With tied embeddings either name fills the shared tensor; Hugging Face files usually hold only one.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    loaded, unexpected, wrong_shape = set(), [], []
    for path in files:
        with open_safetensors(path) as f:
            for name in f.keys():
                if name not in params:
                    unexpected.append(name)
                    continue
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise InputError(f"{path}: tensor {name} cannot be read ({e})") from None
                target = params[name]
                if not tensor.is_floating_point():
                    raise InputError(f"{path}: tensor {name} is {tensor.dtype}, expected floating-point weights")
                if not bool(torch.isfinite(tensor).all()):
                    raise InputError(f"{path}: tensor {name} holds NaN or infinite values")
                if tuple(tensor.shape) != tuple(target.shape):
                    wrong_shape.append(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
                    loaded.add(name)  # present, reported as misshaped rather than missing
                    continue
                with torch.no_grad():
                    target.copy_(tensor.to(dtype))
                loaded.add(name)
    if tied and loaded & {"lm_head.weight", "model.embed_tokens.weight"}:
        loaded |= {"lm_head.weight", "model.embed_tokens.weight"}  # one storage, filled by either name
    missing = [n for n in params if n not in loaded]
    problems = [f"missing: {', '.join(missing)}"] if missing else []
    problems += [f"unexpected: {', '.join(unexpected)}"] if unexpected else []
    problems += [f"wrong shape: {'; '.join(wrong_shape)}"] if wrong_shape else []
    if problems:
        where = files[0].parent
        raise InputError(f"{where}: weights do not match the config: " + " | ".join(problems))


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a Hugging Face Qwen2/Qwen2.5, Qwen3 or Llama folder, in `dtype` on `device`, in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    dtype = parse_dtype(dtype)
    config = ModelConfig.from_json(folder / "config.json")
    files = weight_files(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise InputError(f"{folder / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the "
                         f"config's vocab_size {config.vocab_size}")
    outside = [i for i in tokenizer.eos_token_ids if i >= config.vocab_size]
    if outside:
        raise InputError(f"{folder}: end-of-sequence token id {outside[0]} is outside the vocabulary "
                         f"[0, {config.vocab_size})")
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = Decoder(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives the tied pair two storages; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_into(model, files, dtype)
    return model.eval(), tokenizer


def save_pretrained(model: Decoder, tokenizer: Tokenizer | None, path):
    """Write config.json, model.safetensors (tied weights once) and the tokenizer's files (Tokenizer.save)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    if tokenizer is not None:
        ids = tokenizer.eos_token_ids
        config["eos_token_id"] = ids[0] if len(ids) == 1 else ids or None
        tokenizer.save(folder)
    state = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}  # tied: once
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
