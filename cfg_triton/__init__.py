"""Fused classifier-free guidance for language-model generation."""
from . import reference
from .ops import guidance, triton_available, uses_triton
from .processors import CFGLogitsProcessor, UnbatchedCFGLogitsProcessor, patch_transformers
from .sampler import generate

__all__ = [
    "CFGLogitsProcessor",
    "UnbatchedCFGLogitsProcessor",
    "generate",
    "guidance",
    "patch_transformers",
    "reference",
    "triton_available",
    "uses_triton",
]
__version__ = "0.1.0"
