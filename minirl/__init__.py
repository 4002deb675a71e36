"""minirl: memory-constrained RL for LLM reasoning (GRPO, S-GRPO, T-SPMO) on a self-contained Qwen2/Qwen3/Llama decoder.

See DESIGN.md (shipped as DESIGN.md in the repository) for the layout, the public API and the math.
"""

from minirl.pretrained import load_pretrained, save_pretrained
from minirl.generate import generate
from minirl.model import Decoder
from minirl.model_config import ModelConfig

__all__ = ["Decoder", "ModelConfig", "generate", "load_pretrained", "save_pretrained"]
