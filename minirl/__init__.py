"""minirl: memory-constrained RL for LLM reasoning (GRPO, S-GRPO, T-SPMO) on a self-contained Qwen2.

See ../shared/DESIGN.md (shipped as DESIGN.md in the repository) for the layout, the public API and the math.
"""

from minirl.checkpoint import load_pretrained, save_pretrained
from minirl.generate import generate
from minirl.model import Qwen2, Qwen2Config

__all__ = ["Qwen2", "Qwen2Config", "generate", "load_pretrained", "save_pretrained"]
