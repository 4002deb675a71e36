"""One decoder for three Hugging Face families — Qwen2/Qwen2.5, Qwen3 and Llama (2, 3.x, SmolLM2) —
module names identical to Hugging Face's.

    x = embed(ids)
    for each layer:  x = x + Attn(RMSNorm(x));  x = x + MLP(RMSNorm(x))
    logits = lm_head(RMSNorm(x))

Attention is grouped-query (H query heads share Hkv key/value heads) with rotary position embeddings
(RoPE) in the "rotate half" layout. The MLP is SwiGLU: down(silu(gate(x)) * up(x)). Keeping Hugging
Face's module names (`model.layers.3.self_attn.q_proj`) means a checkpoint's tensor names are our
parameter names, and a PEFT adapter's keys map one to one.

The families differ in a few ModelConfig fields (model_config.py; DESIGN.md, "Model families"),
not in classes:
- qkv_bias / o_bias / mlp_bias: Qwen2 has biases on q, k and v only; Llama and Qwen3 read one
  `attention_bias` for q, k, v and o (false in every released checkpoint), Llama also `mlp_bias`;
- qk_norm (Qwen3): an RMSNorm over each head's Dh features of q and of k, before RoPE;
- rope_scaling (Llama 3.1/3.2, `rope_type` "llama3"): long wavelengths stretched by `factor`, short
  ones kept, a smooth blend between (rope_inv_freq).

Three things here exist for RL rather than for inference (see DESIGN.md, "The math"):
- `hidden_states` returns the final-norm output, so log-probs of selected tokens can be computed by
  the fused kernel without forming B×T×V logits;
- layers below the first one that holds a trainable parameter run under `torch.no_grad()`: with LoRA
  on the last layers only, no activations are kept for the frozen bottom of the network;
- with `model.checkpoint_layers = True` the layers above run under activation checkpointing: each keeps
  only its input, and the backward recomputes one layer's activations at a time.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minirl.errors import InputError
from minirl.model_config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * w, computed in fp32 as Qwen2 does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """RoPE's frequencies f_i = θ^(−2i/Dh), i < Dh/2, optionally with Llama 3's scaling: (Dh/2,).

    Llama 3 (factor s, low/high_freq_factor l < h, original context L): a pair whose wavelength
    λ_i = 2π / f_i is shorter than L/h turns many times within the trained context and is kept; one
    longer than L/l is slowed to f_i / s; between, f_i ← (1 − α) f_i / s + α f_i with α = (L/λ_i − l) / (h − l).
    The result depends on no sequence length, so positions past L need nothing more.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    s, lo, hi, L = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings"))
    wavelength = 2 * math.pi / inv_freq
    alpha = (L / wavelength - lo) / (hi - lo)
    blended = (1 - alpha) * inv_freq / s + alpha * inv_freq
    slowed = torch.where(wavelength > L / lo, inv_freq / s, blended)
    return torch.where(wavelength < L / hi, inv_freq, slowed)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: dict | None = None):
    """cos, sin of angle position · f_i (rope_inv_freq), duplicated over both halves: (B, T, Dh) each."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)  # (Dh/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, Dh); rotate the pairs (x_i, x_{i+Dh/2})."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def grouped_query_attention(q, k, v, mask):
    """softmax(q kᵀ / √Dh) v for one query per row (a decode step), masked: (B, H, 1, Dh).

    q: (B, H, 1, Dh); k, v: (B, Hkv, Tk, Dh); mask: bool (B, 1, 1, Tk). The G = H / Hkv query heads
    that share a key/value head are multiplied as one (G, Dh) block, so each cached key and value is
    read once per step; SDPA's CPU kernel reads them once per query head, G times.
    """
    B, H, _, Dh = q.shape
    Hkv = k.shape[1]
    scores = q.reshape(B, Hkv, H // Hkv, Dh) @ k.transpose(-1, -2) * Dh ** -0.5  # (B, Hkv, G, Tk)
    weights = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
    return (weights @ v).view(B, H, 1, Dh)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D, Dh = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3: one RMSNorm weight of Dh features, shared by every head
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, cache_start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.qk_norm:  # over each head's Dh features, before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache  # (B, Hkv, Tmax, Dh) each, preallocated
            if isinstance(cache_start, torch.Tensor):  # (T,) slots: static shapes for torch.compile; the
                k_cache.index_copy_(2, cache_start, k)  # whole buffer is attended, the mask hides unwritten slots
                v_cache.index_copy_(2, cache_start, v)
                k, v = k_cache, v_cache
            else:
                k_cache[:, :, cache_start:cache_start + T] = k
                v_cache[:, :, cache_start:cache_start + T] = v
                k, v = k_cache[:, :, :cache_start + T], v_cache[:, :, :cache_start + T]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif T == 1 and x.device.type == "cpu" and k.numel() >= 2 ** 16:  # a decode step, a cache worth reading once
            y = grouped_query_attention(q, k, v, mask)  # (B, H, 1, Dh); below, SDPA's one call is the cheaper
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=config.mlp_bias)
        self.up_proj = nn.Linear(D, F_, bias=config.mlp_bias)
        self.down_proj = nn.Linear(F_, D, bias=config.mlp_bias)

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
    """Hugging Face's `Qwen2Model` / `LlamaModel`: embedding, layers and final norm (named `model` in checkpoints)."""

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

    def rope(self, positions, dtype):
        """RoPE's (cos, sin) at positions (B, T), with this model's θ and scaling: (B, T, Dh) each."""
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype, self.config.rope_scaling)

    def hidden_states(self, input_ids, positions=None, mask=None, cache=None, cache_start=0, rope=None, check=True,
                      start=None, stop=None):
        """Final-norm hidden states (B, T, D).

        positions: (B, T) RoPE positions, default 0..T−1 (after cache_start when a cache is given).
        mask: bool (B, 1, T, Tk), True where a query may attend; None means plain causal.
        cache: per-layer (k, v) buffers of shape (B, Hkv, Tmax, Dh); the T new keys go at cache_start,
        an int, or a (T,) tensor of slots (then the whole buffer is attended: static shapes for torch.compile).
        rope: (cos, sin) of these positions, (B, T, Dh) each, when the caller has them (generate's table).
        check: False skips the token-id and position checks, each a host synchronisation; generate checks
        its prefixes once, and the ids it samples are in the vocabulary by construction.
        start, stop: run the layers [i, stop) only. start = (i, x) resumes from x (B, T, D), the output of the
        layers below i; with stop, the output of layer stop − 1 comes back, without the final norm. GRPO's
        KL reference shares the layers below the first adapter with the policy so (logprobs.py).
        """
        B, T = input_ids.shape
        if positions is None and rope is None:
            positions = torch.arange(cache_start, cache_start + T, device=input_ids.device).expand(B, T)
        if check:
            self.check_input_ids(input_ids, positions)
        if mask is None and cache is not None and cache_start > 0:
            raise ValueError("a cached forward after the first chunk needs an explicit mask")
        grad = torch.is_grad_enabled()
        # Under no_grad (every decode step) the search is skipped: it walks every parameter of the model.
        first_trainable = next((i for i, layer in enumerate(self.model.layers)
                                if grad and any(p.requires_grad for p in layer.parameters())), len(self.model.layers))
        begin, x = start if start is not None else (0, self.model.embed_tokens(input_ids))  # x: (B, T, D)
        cos, sin = rope if rope is not None else self.rope(positions, x.dtype)
        # Never with a KV cache: the backward's recomputation would write the layer's k and v a second time.
        recompute = self.checkpoint_layers and grad and cache is None
        for i in range(begin, len(self.model.layers) if stop is None else stop):
            layer = self.model.layers[i]
            # Frozen layers below every adapter need no graph: the backward stops at layer first_trainable.
            with torch.set_grad_enabled(grad and i >= first_trainable):
                if recompute and i >= first_trainable:
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)  # keeps x, (B, T, D)
                else:
                    x = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_start)
        return x if stop is not None else self.model.norm(x)

    def forward(self, input_ids, **kwargs):
        return self.lm_head(self.hidden_states(input_ids, **kwargs))  # (B, T, V)

    def new_cache(self, batch_size: int, max_len: int):
        """Preallocated key/value buffers, one (k, v) pair per layer: (B, Hkv, Tmax, Dh) each.

        Zeros, not empty: a slot no token wrote is masked out, but a NaN there would still reach the
        attention's output as 0 · NaN."""
        c, p = self.config, self.lm_head.weight
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        return [(torch.zeros(shape, dtype=p.dtype, device=p.device), torch.zeros(shape, dtype=p.dtype, device=p.device))
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
