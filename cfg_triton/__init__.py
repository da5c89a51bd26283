"""Fused classifier-free guidance for language-model generation."""
from . import reference
from .logprobs import token_logprobs
from .ops import guidance, triton_available, uses_triton
from .processors import CFGLogitsProcessor, UnbatchedCFGLogitsProcessor
from .sampler import generate
from .sampling import sample
from .scoring import score, score_tokens
from .transformers import patch_transformers

__all__ = [
    "CFGLogitsProcessor",
    "UnbatchedCFGLogitsProcessor",
    "generate",
    "guidance",
    "patch_transformers",
    "reference",
    "sample",
    "score",
    "score_tokens",
    "token_logprobs",
    "triton_available",
    "uses_triton",
]
__version__ = "0.1.0"
