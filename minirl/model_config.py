"""A model's shape and family, read from (and written back to) a Hugging Face config.json.

Three families share one Decoder (model.py); config.json's `model_type` sets the few fields in which
they differ (DESIGN.md, "Model families"). Reading is strict: a setting this decoder would silently
get wrong (sliding windows, another activation, another RoPE type) is refused with one line naming the
file and the field, and `to_hf_dict` writes a config.json that the family's transformers class reads
back as this same model.
"""

import json
import math
from dataclasses import asdict, dataclass, fields

from minirl.errors import InputError


# model_type -> the transformers class that reads the folder back (written as `architectures`).
FAMILIES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


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
    model_type: str = "qwen2"  # a key of FAMILIES
    qkv_bias: bool | None = None  # None: the family's own (Qwen2 true, Llama and Qwen3 false)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool | None = None  # None: the family's own (Qwen3 true)
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", and the four LLAMA3_ROPE numbers}

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.model_type == "qwen2"
        if self.qk_norm is None:
            self.qk_norm = self.model_type == "qwen3"
        self.validate()

    def validate(self, source: str = "config"):
        def need(ok, field, expected):
            if not ok:
                raise InputError(f"{source}: field '{field}' is {getattr(self, field)!r}, expected {expected}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, "a positive integer")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
                 name, "a finite positive number")
        need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings", "true or false")
        eos = [] if self.eos_token_id is None else [self.eos_token_id] if not isinstance(self.eos_token_id, list) \
            else self.eos_token_id
        need(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in eos),
             "eos_token_id", f"null, or token ids in [0, {self.vocab_size})")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads ({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, "head_dim", "an even number (RoPE rotates pairs)")
        need(self.model_type in FAMILIES, "model_type", f"one of {', '.join(map(repr, FAMILIES))}")
        # What each family's config.json can say, so that to_hf_dict writes this same model back.
        fixed = {"qwen2": dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False),
                 "qwen3": dict(o_bias=self.qkv_bias, mlp_bias=False, qk_norm=True),
                 "llama": dict(o_bias=self.qkv_bias, qk_norm=False)}[self.model_type]
        for name, value in fixed.items():
            need(getattr(self, name) == value, name, f"{value} for model_type {self.model_type!r}")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            need(isinstance(s, dict) and s.get("rope_type") == "llama3", "rope_scaling", "None or a 'llama3' scaling")
            for key in LLAMA3_ROPE:
                value = s.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise InputError(f"{source}: RoPE scaling field '{key}' is {value!r}, expected a positive number")
            if not s["high_freq_factor"] > s["low_freq_factor"]:
                raise InputError(f"{source}: RoPE scaling field 'high_freq_factor' is {s['high_freq_factor']!r}, "
                                 f"expected more than low_freq_factor ({s['low_freq_factor']!r})")

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face Qwen2, Qwen3 or Llama config; refuse settings this model would silently get wrong."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(d).__name__}")
        family = d.get("model_type", "qwen2")
        if family not in FAMILIES:
            raise InputError(f"{source}: field 'model_type' is {family!r}, expected one of "
                             f"{', '.join(map(repr, FAMILIES))}")
        if d.get("use_sliding_window"):
            raise InputError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not implemented")
        windowed = sorted(set(d.get("layer_types") or []) - {"full_attention"})
        if windowed:
            raise InputError(f"{source}: field 'layer_types' names {windowed[0]!r}; only 'full_attention' is implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise InputError(f"{source}: field 'hidden_act' is {d['hidden_act']!r}, expected 'silu'")
        # transformers < 5 writes rope_theta and rope_scaling; transformers >= 5 writes rope_parameters.
        for key in ("rope_scaling", "rope_parameters"):
            if not isinstance(d.get(key) or {}, dict):
                raise InputError(f"{source}: field '{key}' is {d[key]!r}, expected an object")
        rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "llama3"):
            raise InputError(f"{source}: RoPE type {rope_type!r} is not implemented, expected 'default' or 'llama3'")
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise InputError(f"{source}: field 'partial_rotary_factor' is {partial!r}, expected 1.0 (RoPE on every pair)")
        scaling = None
        if rope_type == "llama3":
            missing = [key for key in LLAMA3_ROPE if key not in rope]
            if missing:
                raise InputError(f"{source}: RoPE type 'llama3' needs field '{missing[0]}'")
            scaling = {"rope_type": "llama3", **{key: rope[key] for key in LLAMA3_ROPE}}
        for key in ("attention_bias", "mlp_bias"):
            if not isinstance(d.get(key, False), bool):
                raise InputError(f"{source}: field '{key}' is {d[key]!r}, expected true or false")
        d = dict(d)
        d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if required not in d:
                raise InputError(f"{source}: missing field '{required}'")
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        d.setdefault("tie_word_embeddings", False)  # the default of all three Hugging Face configs
        d.setdefault("max_position_embeddings", 2048 if family == "llama" else 32768)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs.setdefault("head_dim", 128 if family == "qwen3" else 0)  # Qwen3Config's default is 128
        kwargs["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "float32")
        # The family decides these; keys a family does not read (a Qwen2 config's mlp_bias) are ignored, as there.
        attention_bias = d.get("attention_bias", False)
        kwargs.update(model_type=family, qkv_bias=family == "qwen2" or attention_bias,
                      o_bias=family != "qwen2" and attention_bias, mlp_bias=family == "llama" and d.get("mlp_bias", False),
                      qk_norm=family == "qwen3", rope_scaling=scaling)
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
        """config.json for the family's transformers class, in transformers 5's format (rope_parameters)."""
        d = asdict(self)
        for name in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm"):
            del d[name]  # implied by model_type and the flags below
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        d.update(architectures=[FAMILIES[self.model_type]], hidden_act="silu", rope_parameters=rope)
        if self.model_type != "llama":
            d["use_sliding_window"] = False
        if self.model_type != "qwen2":
            d["attention_bias"] = self.o_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        return {k: v for k, v in d.items() if v is not None}
