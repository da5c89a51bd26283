"""Triton kernels of cfg_triton, installed as `cfg_triton.kernels` (see setup.py)."""
