"""LoRA by hand, saved and loaded in PEFT's file format.

A frozen linear map y = W x + b (W: out × in) gets a trainable low-rank update (Hu et al., 2021):

    y = W x + b + s · B A x,    A: (r, in),  B: (out, r),  s = lora_alpha / r

A starts as PEFT starts it, kaiming-uniform with a = √5, which is U(−1/√in, 1/√in); B starts at zero,
so a fresh adapter changes nothing. The paper (DESIGN.md, "Shared setup") adapts q_proj and v_proj of
the last layers only: the last third for SVAMP (r = 16), the last quarter for multiplication (r = 8).
Every base parameter is frozen; `lora_parameters` is all the optimizer ever sees.

Precision. A and B are fp32 even when W is bf16: the adapter path casts x to fp32, computes
s · B A x there, adds it to the base output and rounds once to the base dtype (as PEFT does). A bf16
base with fp32 adapters is the memory setting the paper's runs rely on: the optimizer state is only
that of A and B.

The reference policy for free. `disable_adapters(model)` switches every adapter off for the duration of
a `with` block: GRPO's KL reference π_ref is the base model, computed by the same weights, no copy.

No merging and no dropout. Folding s · B A into W would save each adapted map's two thin products
(r ≪ D) per decode step, but a merged bf16 model rounds W + ΔW where training rounds W x + ΔW x, so it
samples from a slightly different policy than the one trained, and unmerging exactly needs a copy of W.
Dropout is a regulariser the RL losses here do not use; it is not part of what an adapter computes.

File format. `save_adapter` writes what `peft.PeftModel.save_pretrained` writes: adapter_config.json
(peft_type "LORA", r, lora_alpha, target_modules, layers_to_transform, ...) and
adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`,
where <module> is the module's name in this model (Hugging Face's names, e.g.
`model.layers.3.self_attn.q_proj`). Inside the model the wrapped layer is `<module>.base`, which
PEFT calls `<module>.base_layer`. `load_adapter` reads adapters PEFT wrote (their lora_dropout is a
training setting of PEFT's, checked and not used).
"""

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

from minirl.pretrained import open_safetensors
from minirl.errors import InputError
from minirl.files import write_atomic

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NAMED_LAYERS = {"all": Fraction(1), "last-half": Fraction(1, 2), "last-third": Fraction(1, 3),
                "last-quarter": Fraction(1, 4)}
LAYER_FORMS = ("all, last-half, last-third, last-quarter, last:N, a fraction of the last layers such as 0.25, "
               "or a comma list of layer indices such as 0,3,5")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the whole causal LM as base_model.model


@dataclass
class LoRAConfig:
    """What `add_lora` did to a model, kept as `model.lora_config` so the adapter can be saved."""

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] = ()
    rank: int = 16
    alpha: float = 32.0


class LoRALinear(nn.Module):
    """y = base(x) + s · B A x, s = alpha / rank; `base` frozen, A and B trainable fp32."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        A = torch.empty(rank, base.in_features, dtype=torch.float32,
                        device=device if generator is None else generator.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # U(−1/√in, 1/√in), as PEFT
        self.lora_A = nn.Parameter(A.to(device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))  # (out, r)
        self.enabled = True

    def forward(self, x):
        y = self.base(x)  # (..., out), base dtype
        if not self.enabled:
            return y
        h = x.to(torch.float32)  # no copy when x is fp32 already
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale  # (..., out), fp32
        return (y + delta).to(y.dtype)  # added in fp32, rounded once

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every adapted layer, names as Hugging Face and PEFT spell them."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def first_adapted_layer(model: nn.Module) -> int:
    """The lowest layer that holds an adapter (the number of layers if none): the layers below it compute
    the same with the adapters on or off, in π_θ and in π_ref alike."""
    adapted = [int(re.match(r"model\.layers\.(\d+)\.", name)[1]) for name, _ in lora_modules(model)]
    return min(adapted, default=len(model.model.layers))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A and B of every adapter, in module order: what the optimizer gets."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def last_layers(n_layers: int, fraction: Fraction) -> list[int]:
    """The last ⌈n · fraction⌉ layers, at least one."""
    k = max(1, math.ceil(n_layers * fraction))
    return list(range(n_layers - k, n_layers))


def parse_layers(spec, n_layers: int) -> list[int]:
    """`--lora-layers` (add_lora's `layers`) to sorted layer indices. spec: None (every layer), a list of
    indices, or text: all, last-half/third/quarter, last:N, a fraction of the last layers (has a dot), 0,3,5."""
    if spec is None:
        return list(range(n_layers))

    def bad(why="is not a layer choice"):
        return InputError(f"--lora-layers: {spec!r} {why}; expected {LAYER_FORMS}")

    if isinstance(spec, (list, tuple, range)):
        indices = list(spec)
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise bad("is not a non-empty list of layer indices")
    elif not isinstance(spec, str):
        raise bad()
    else:
        text = spec.strip().lower()
        if text in NAMED_LAYERS:
            return last_layers(n_layers, NAMED_LAYERS[text])
        try:
            if text.startswith("last:"):
                k = int(text.removeprefix("last:"))
                if not 1 <= k <= n_layers:
                    raise bad(f"asks for the last {k} layers, the model has {n_layers}")
                return list(range(n_layers - k, n_layers))
            if "." in text:
                fraction = Fraction(text)  # exact: "0.1" is 1/10, so rounding up never adds a layer by accident
                if not 0 < fraction <= 1:
                    raise bad("is a fraction outside (0, 1]")
                return last_layers(n_layers, fraction)
            indices = [int(part) for part in text.split(",")]
        except InputError:
            raise
        except ValueError:
            raise bad() from None
    for i in indices:
        if not 0 <= i < n_layers:
            raise InputError(f"--lora-layers: layer {i} is out of range, the model has {n_layers} layers "
                             f"(0 to {n_layers - 1})")
    return sorted(set(indices))


def parse_targets(text) -> tuple[str, ...]:
    """`--lora-targets` ("q_proj,v_proj", or add_lora's list of names) to names in TARGETS' order: one
    canonical order, so the same names give the same initialisation and the same files."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [t for t in names if t != ""]
    bad = [str(t) for t in names if t not in TARGETS]
    if bad or not names:
        raise InputError(f"--lora-targets: {','.join(bad) or 'empty'} is not a module name, "
                         f"expected some of {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def base_linear(model, layer: int, target: str) -> nn.Linear:
    module = getattr(getattr(model.model.layers[layer], PARENT[target]), target)
    return module.base if isinstance(module, LoRALinear) else module


def add_lora(model, targets=("q_proj", "v_proj"), layers=None, rank: int = 16, alpha: float = 32,
             generator: torch.Generator | None = None):
    """Freeze every parameter of `model` and wrap targets × layers in LoRALinear; returns the model.

    targets: names among TARGETS, or "q_proj,v_proj" as --lora-targets writes them.
    layers: None (all), a list of indices, or any --lora-layers text ("last-quarter", "0.25", "0,3,5").
    """
    if lora_modules(model):
        raise InputError("add_lora: the model already has LoRA adapters")
    targets = parse_targets(targets)
    layers = parse_layers(layers, len(model.model.layers))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InputError(f"--lora-rank: {rank!r} is not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise InputError(f"--lora-alpha: {alpha!r} is not a positive number")
    model.requires_grad_(False)
    for i in layers:
        for t in targets:
            parent = getattr(model.model.layers[i], PARENT[t])
            setattr(parent, t, LoRALinear(getattr(parent, t), rank, float(alpha), generator))
    model.lora_config = LoRAConfig(targets, tuple(layers), rank, float(alpha))
    return model


@contextmanager
def disable_adapters(model):
    """Inside the block the model is its base model (π_ref); the adapters come back after."""
    modules = [m for _, m in lora_modules(model)]
    was_enabled = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(modules, was_enabled):
            m.enabled = enabled


def peft_config(cfg: LoRAConfig, base_model_name_or_path: str = "") -> dict:
    """adapter_config.json as PEFT writes it (fields PEFT omits here take PEFT's defaults on load)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
            "revision": None, "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0,
            "target_modules": list(cfg.targets), "layers_to_transform": list(cfg.layers), "layers_pattern": None,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def save_adapter(model, path, base_model_name_or_path: str = ""):
    """Write adapter_config.json and adapter_model.safetensors into the folder `path` (created if needed)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise InputError("save_adapter: the model has no LoRA adapters (call add_lora first)")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in lora_modules(model):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()  # (out, r)
    write_atomic(folder / WEIGHTS_FILE, safetensors_bytes(tensors, metadata={"format": "pt"}))
    config = peft_config(cfg, base_model_name_or_path)
    write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def config_from_peft(d, source: Path, n_layers: int) -> LoRAConfig:
    """A PEFT adapter_config.json as a LoRAConfig; refuses every PEFT feature this file does not implement."""
    if not isinstance(d, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(d).__name__}")

    def need(ok, field, expected):
        if not ok:
            raise InputError(f"{source}: field '{field}' is {d.get(field)!r}, expected {expected}")

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    need(d.get("peft_type") == "LORA", "peft_type", "'LORA'")
    rank, alpha, dropout = d.get("r"), d.get("lora_alpha", 8), d.get("lora_dropout", 0.0)
    need(isinstance(rank, int) and not isinstance(rank, bool) and rank > 0, "r", "a positive integer")
    need(is_number(alpha) and alpha > 0, "lora_alpha", "a positive number")
    need(is_number(dropout) and 0 <= dropout < 1, "lora_dropout", "a probability in [0, 1)")
    need(d.get("bias", "none") in ("none", None), "bias", "'none'")
    for field in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
                  "modules_to_save", "layer_replication", "exclude_modules", "trainable_token_indices",
                  "target_parameters"):
        need(not d.get(field), field, "false, null or empty (not implemented here)")
    need(d.get("layers_pattern") in (None, "", [], "layers", ["layers"]), "layers_pattern", "null or 'layers'")

    wanted, layer_field = d.get("target_modules"), d.get("layers_to_transform")
    if isinstance(wanted, str):  # PEFT: a regular expression that must match a module's full name
        need(layer_field is None, "layers_to_transform", "null when target_modules is a regular expression")
        try:
            pattern = re.compile(wanted)
        except re.error as e:
            raise InputError(f"{source}: field 'target_modules' is not a regular expression ({e})") from None
        hits = [(i, t) for i in range(n_layers) for t in TARGETS
                if pattern.fullmatch(f"model.layers.{i}.{PARENT[t]}.{t}")]
        targets = tuple(t for t in TARGETS if any(t == h for _, h in hits))
        layers = sorted({i for i, _ in hits})
        need(hits and len(hits) == len(targets) * len(layers), "target_modules",
             "a pattern matching the same targets in every matched layer")
        return LoRAConfig(targets, tuple(layers), rank, float(alpha))

    need(isinstance(wanted, list) and wanted and all(t in TARGETS for t in wanted), "target_modules",
         f"a list of some of {', '.join(TARGETS)}")
    if layer_field is None or layer_field == []:
        layers = list(range(n_layers))
    else:
        layers = [layer_field] if isinstance(layer_field, int) else layer_field
        need(isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers
                                              for i in layers),
             "layers_to_transform", f"null or layer indices in [0, {n_layers}) (the model has {n_layers} layers)")
    return LoRAConfig(tuple(t for t in TARGETS if t in wanted), tuple(sorted(set(layers))), rank, float(alpha))


def load_adapter(model, path):
    """Load an adapter folder written by `save_adapter` or by PEFT; returns the model.

    A model without adapters gets them first (add_lora with the file's settings). A model that has them
    must have the same targets, layers, rank and alpha; its parameters are filled in place, so an
    optimizer that holds them stays valid.
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        d = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{config_path}: file not found (an adapter folder holds {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path}: not valid JSON ({e})") from None
    cfg = config_from_peft(d, config_path, len(model.model.layers))
    current = getattr(model, "lora_config", None)
    if current is not None and current != cfg:
        raise InputError(f"{config_path}: adapter (targets {list(cfg.targets)}, layers {list(cfg.layers)}, "
                         f"r {cfg.rank}, lora_alpha {cfg.alpha}) differs from the model's (targets "
                         f"{list(current.targets)}, layers {list(current.layers)}, r {current.rank}, "
                         f"lora_alpha {current.alpha})")
    if not weights_path.is_file():
        raise InputError(f"{weights_path}: file not found (only safetensors adapters are read, not .bin)")

    expected = {}  # key -> (layer, target, "A" or "B", shape); checked before the model is touched
    for i in cfg.layers:
        for t in cfg.targets:
            base = base_linear(model, i, t)
            name = f"model.layers.{i}.{PARENT[t]}.{t}"
            expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (i, t, "A", (cfg.rank, base.in_features))
            expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (i, t, "B", (base.out_features, cfg.rank))
    tensors, problems = {}, []
    with open_safetensors(weights_path) as f:
        keys = set(f.keys())
        for key in sorted(keys & expected.keys()):
            try:
                tensors[key] = f.get_tensor(key)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise InputError(f"{weights_path}: tensor {key} cannot be read ({e})") from None
    missing, unexpected = sorted(expected.keys() - keys), sorted(keys - expected.keys())
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected (not named by {CONFIG_FILE}): {', '.join(unexpected)}")
    shapes = [f"{k} has shape {tuple(v.shape)}, expected {expected[k][3]}" for k, v in tensors.items()
              if tuple(v.shape) != expected[k][3]]
    if shapes:
        problems.append(f"wrong shape: {'; '.join(shapes)}")
    if problems:
        raise InputError(f"{weights_path}: tensors do not match {CONFIG_FILE}: " + " | ".join(problems))

    if current is None:
        add_lora(model, cfg.targets, list(cfg.layers), cfg.rank, cfg.alpha)
    with torch.no_grad():
        for key, (i, t, which, _) in expected.items():
            module = getattr(getattr(model.model.layers[i], PARENT[t]), t)
            (module.lora_A if which == "A" else module.lora_B).copy_(tensors[key])
    return model
