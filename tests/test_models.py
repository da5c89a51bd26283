"""Loading the bundled models: the converted-checkpoint cache under concurrent first loads and dtypes."""
import os
import subprocess
import sys

import pytest
import torch

from cfg_triton import models

pytestmark = pytest.mark.model

LOAD = ("import sys, torch; from cfg_triton import models; "
        "m, _ = models.load('smollm2', dtype=getattr(torch, sys.argv[1])); "
        "assert next(m.parameters()).dtype == getattr(torch, sys.argv[1])")


@pytest.mark.slow
def test_two_processes_convert_into_one_empty_cache(smollm2, tmp_path, monkeypatch):
    """Both first loads succeed, one of them in bfloat16; the cache holds one complete float32
    checkpoint and nothing else; a later default load returns the float32 weights, not bf16 ones."""
    env = {**os.environ, "CFG_TRITON_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, dtype], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for dtype in ("bfloat16", "float32")]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    (converted,) = (tmp_path / "converted").iterdir()
    assert ".partial" not in converted.name
    assert not any("partial" in p.name or p.name.startswith("tmp") for p in converted.rglob("*"))
    monkeypatch.setenv("CFG_TRITON_CACHE", str(tmp_path))
    model, _ = models.load("smollm2")
    reference, _ = smollm2
    assert next(model.parameters()).dtype == torch.float32
    theirs = reference.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    half, _ = models.load("smollm2", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
