"""A self-contained Qwen2 / Qwen2.5 decoder, module names identical to Hugging Face's.

    x = embed(ids)
    for each layer:  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
    logits = lm_head(RMSNorm(x))

Attention is grouped-query (H query heads share Hkv key/value heads), with biases on q, k and v and
rotary position embeddings (RoPE) in the "rotate half" layout. The MLP is SwiGLU:
down(silu(gate(x)) * up(x)). Keeping Hugging Face's module names (`model.layers.3.self_attn.q_proj`)
means a checkpoint's tensor names are our parameter names, and a PEFT adapter's keys map one to one.

Two things here exist for RL rather than for inference (see DESIGN.md, "The math"):
- `hidden_states` returns the final-norm output, so log-probs of selected tokens can be computed by
  the fused kernel without forming B×T×V logits;
- layers below the first one that holds a trainable parameter run under `torch.no_grad()`: with LoRA
  on the last layers only, no activations are kept for the frozen bottom of the network;
- with `model.checkpoint_layers = True` the layers above run under activation checkpointing: each keeps
  only its input, and the backward recomputes one layer's activations at a time.
"""

import json
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minirl.errors import InputError


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // num_attention_heads, as Hugging Face defaults it
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self, source: str = "config"):
        def need(ok, field, expected):
            if not ok:
                raise InputError(f"{source}: field '{field}' is {getattr(self, field)!r}, expected {expected}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads ({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "a positive number")
        need(self.rope_theta > 0, "rope_theta", "a positive number")

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face Qwen2 config; refuse settings this model would silently get wrong."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "qwen2") != "qwen2":
            raise InputError(f"{source}: field 'model_type' is {d['model_type']!r}, expected 'qwen2'")
        if d.get("use_sliding_window"):
            raise InputError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise InputError(f"{source}: field 'hidden_act' is {d['hidden_act']!r}, expected 'silu'")
        # transformers < 5 writes rope_theta and rope_scaling; transformers >= 5 writes rope_parameters.
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise InputError(f"{source}: RoPE type {rope_type!r} is not implemented, expected 'default'")
        d = dict(d)
        d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if required not in d:
                raise InputError(f"{source}: missing field '{required}'")
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        d.setdefault("tie_word_embeddings", False)  # Hugging Face's ModelConfig default
        d.setdefault("max_position_embeddings", 32768)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs.setdefault("head_dim", 0)
        kwargs["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "float32")
        try:
            config = cls.__new__(cls)
            for f in fields(cls):
                setattr(config, f.name, kwargs.get(f.name, f.default))
            config.__post_init__()
        except InputError as e:
            raise InputError(str(e).replace("config:", f"{source}:", 1)) from None
        except TypeError as e:
            raise InputError(f"{source}: {e}") from None
        return config

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise InputError(f"{path}: file not found (a model folder needs config.json)") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        d = asdict(self)
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                 use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return {k: v for k, v in d.items() if v is not None}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * w, computed in fp32 as Qwen2 does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of angle position · θ^(−2i/Dh), duplicated over both halves: (B, T, Dh) each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, Dh); rotate the pairs (x_i, x_{i+Dh/2})."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D, Dh = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * Dh, bias=True)
        self.k_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=True)
        self.v_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=True)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, cache_start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache  # (B, Hkv, Tmax, Dh) each, preallocated
            k_cache[:, :, cache_start:cache_start + T] = k
            v_cache[:, :, cache_start:cache_start + T] = v
            k, v = k_cache[:, :, :cache_start + T], v_cache[:, :, :cache_start + T]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """Hugging Face's `Qwen2Model`: embedding, layers and final norm (named `model` in checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Activation checkpointing (train.py --checkpoint-layers): a layer that runs with grad keeps only its
        # input and recomputes its activations in the backward, one layer at a time.
        self.checkpoint_layers = False

    def check_input_ids(self, input_ids, positions):
        V, P = self.config.vocab_size, self.config.max_position_embeddings
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise InputError(f"input_ids: token id {bad} is outside the vocabulary [0, {V})")
        if int(positions.max()) >= P:
            raise InputError(f"input_ids: position {int(positions.max())} is past max_position_embeddings ({P})")

    def hidden_states(self, input_ids, positions=None, mask=None, cache=None, cache_start=0):
        """Final-norm hidden states (B, T, D).

        positions: (B, T) RoPE positions, default 0..T−1 (after cache_start when a cache is given).
        mask: bool (B, 1, T, Tk), True where a query may attend; None means plain causal.
        cache: per-layer (k, v) buffers of shape (B, Hkv, Tmax, Dh); the T new keys go at cache_start.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(cache_start, cache_start + T, device=input_ids.device).expand(B, T)
        self.check_input_ids(input_ids, positions)
        if mask is None and cache is not None and cache_start > 0:
            raise ValueError("a cached forward after the first chunk needs an explicit mask")
        grad = torch.is_grad_enabled()
        # Under no_grad (every decode step) the search is skipped: it walks every parameter of the model.
        first_trainable = next((i for i, layer in enumerate(self.model.layers)
                                if grad and any(p.requires_grad for p in layer.parameters())), len(self.model.layers))
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        # Never with a KV cache: the backward's recomputation would write the layer's k and v a second time.
        recompute = self.checkpoint_layers and grad and cache is None
        for i, layer in enumerate(self.model.layers):
            # Frozen layers below every adapter need no graph: the backward stops at layer first_trainable.
            with torch.set_grad_enabled(grad and i >= first_trainable):
                if recompute and i >= first_trainable:
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)  # keeps x, (B, T, D)
                else:
                    x = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_start)
        return self.model.norm(x)

    def forward(self, input_ids, **kwargs):
        return self.lm_head(self.hidden_states(input_ids, **kwargs))  # (B, T, V)

    def new_cache(self, batch_size: int, max_len: int):
        """Preallocated key/value buffers, one (k, v) pair per layer: (B, Hkv, Tmax, Dh) each."""
        c, p = self.config, self.lm_head.weight
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        return [(torch.empty(shape, dtype=p.dtype, device=p.device), torch.empty(shape, dtype=p.dtype, device=p.device))
                for _ in range(c.num_hidden_layers)]


def init_weights(model: Decoder, std: float = 0.02, generator: torch.Generator | None = None):
    """Random weights for tests and the tiny model: normal(0, std) matrices, zero biases, unit norms."""
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
    return model
