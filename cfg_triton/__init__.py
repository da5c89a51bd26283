"""Fused classifier-free guidance for language-model generation."""
from . import reference
from .ops import guidance, triton_available, uses_triton
from .processors import CFGLogitsProcessor, UnbatchedCFGLogitsProcessor
from .sampler import generate
from .transformers import patch_transformers

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
