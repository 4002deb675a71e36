"""Fused GPU kernels, installed as `minirl.kernels` (see DESIGN.md, "Layout")."""

from .fused_logprobs import gathered_logprobs

__all__ = ["gathered_logprobs"]
