"""Compiles every kernel specialization the launcher can choose for sm_80 and sm_90, no GPU needed.

    python -m cfg_triton.aot [--arch 80 90] [--json] [--one-per-kernel]

Prints, per specialization and architecture, registers, spill bytes (local memory and stack) and
shared memory, as read from the cubin by the `cuobjdump` shipped in the Triton wheel. Exits 1 if
any specialization spills. Run it with TRITON_INTERPRET unset: interpreted kernels cannot compile.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def _resources(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{text}")
    regs, stack, shared, local = map(int, found.groups())
    return {"registers": regs, "stack": stack, "shared": shared, "local": local}


def specializations():
    """Every (kernel, signature, constexprs, num_warps) the launchers can produce."""
    from .kernels import guidance, sampling, token_logprobs

    return [*guidance.specializations(), *token_logprobs.specializations(),
            *sampling.specializations()]


def compile_kernel(kernel, signature, constexprs, num_warps, arch, aligned):
    """Triton's compiled kernel for `sm_<arch>`; `aligned`: pointers and ints divisible by 16, as
    the JIT marks them for fresh tensors."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values())
             if aligned and (t.startswith("*") or t == "i32")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton_compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_all(archs=(80, 90), one_per_kernel=False):
    """One dict per (specialization, arch, alignment) with its resources; `one_per_kernel`: the
    first specialization of each kernel, aligned only (a quick check that every family compiles)."""
    specs = specializations()
    if one_per_kernel:
        first = {}
        for spec in specs:
            first.setdefault(spec[0].__name__, spec)
        specs = list(first.values())
    rows = []
    for kernel, signature, constexprs, num_warps in specs:
        for aligned in (True,) if one_per_kernel else (True, False):
            for arch in archs:
                compiled = compile_kernel(kernel, signature, constexprs, num_warps, arch, aligned)
                rows.append({
                    "kernel": kernel.__name__,
                    "arch": f"sm_{arch}",
                    "aligned": aligned,
                    "dtypes": {k: v for k, v in signature.items() if v.startswith("*")},
                    "constexprs": {k: v for k, v in constexprs.items() if v is not None},
                    "num_warps": num_warps,
                    **_resources(compiled.asm["cubin"]),
                })
    return rows


def parse_for_compiling(parser, argv):
    """The parsed arguments of a command that compiles kernels, once the environment allows it."""
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    # The JIT's default, so that what is counted is what a launch compiles.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--one-per-kernel", action="store_true",
                        help="only the first specialization of each kernel, aligned")
    args = parse_for_compiling(parser, argv)
    rows = compile_all(args.arch, args.one_per_kernel)
    if args.json:
        json.dump(rows, sys.stdout)
    else:
        for r in rows:
            spec = " ".join(f"{k}={v}" for k, v in r["constexprs"].items()
                            if k not in ("BLOCK", "MAX_SPLITS"))
            print(f"{r['kernel']:28} {r['arch']} {'aligned' if r['aligned'] else 'unaligned':9} "
                  f"{r['dtypes'].get('c_ptr', '-'):6} {r['dtypes'].get('out_ptr', '-'):6} {spec:45} "
                  f"regs={r['registers']:3} spill={r['local'] + r['stack']} smem={r['shared']}")
    return 1 if any(r["local"] or r["stack"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
