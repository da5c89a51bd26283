"""Fused classifier-free guidance for language-model generation."""
from . import reference
from .ops import guidance, triton_available, uses_triton

__all__ = ["guidance", "reference", "triton_available", "uses_triton"]
__version__ = "0.1.0"
