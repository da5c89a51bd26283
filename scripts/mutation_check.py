"""Plants one-line bugs in a temporary copy of the repository and checks that the tests catch each.

    .venv/bin/python scripts/mutation_check.py [--only NAME ...] [--list]

Each mutation replaces one line-sized piece of source text and runs only the tests meant to catch
it (in the copy, imported ahead of the installed package). A mutation that leaves those tests green
has survived: the suite has a hole there. Exits 1 if any survived. Takes a few minutes; not part of
CI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, original text, planted text, pytest arguments that must fail)
MUTATIONS = [
    ("chunked LSE uses the wrong rows' maxima", "cfg_triton/torch_impl.py",
     "torch.sub(x[i : i + rows], top[i : i + rows], out=part)",
     "torch.sub(x[i : i + rows], top[: part.shape[0]], out=part)",
     ["tests/test_guidance.py", "-k", "chunked"]),
    ("CFGLogitsProcessor ignores mix", "cfg_triton/processors.py",
     "guidance(cond, uncond, self.guidance_scale, mix=self.mix, normalize=self.normalize,",
     "guidance(cond, uncond, self.guidance_scale, mix=None, normalize=self.normalize,",
     ["tests/test_processors.py", "-k", "batched_processor"]),
    ("generate ignores the temperature", "cfg_triton/sampler.py",
     "warp_scores(scores, temperature, top_k, top_p)", "warp_scores(scores, 1.0, top_k, top_p)",
     ["tests/test_sampler.py", "-k", "literal_loop"]),
    ("+inf in cond is not poisoned", "cfg_triton/torch_impl.py",
     'c = torch.where(c == float("inf"), nan, c)', "c = c",
     ["tests/test_guidance.py", "-k", "poison and torch"]),
    ("unbatched default branch is the whole prompt", "cfg_triton/processors.py",
     "self.ids = input_ids[:, -1:]", "self.ids = input_ids",
     ["tests/test_processors.py", "-k", "unbatched"]),
    ("unbatched processor ignores mix", "cfg_triton/processors.py",
     "self.guidance_scale, mix=self.mix,\n", "self.guidance_scale, mix=None,\n",
     ["tests/test_processors.py", "-k", "unbatched"]),
    ("a statistics split also counts the next split's first token", "kernels/guidance.py",
     "end = tl.minimum(start + split_len, V)\n    for offset in range(start, end, BLOCK):\n"
     "        idx = offset + lanes\n        c, u, inside = _load_tile(c_row, u_row, idx, end)\n"
     "        c_ref_old",
     "end = tl.minimum(start + split_len + 1, V)\n    for offset in range(start, end, BLOCK):\n"
     "        idx = offset + lanes\n        c, u, inside = _load_tile(c_row, u_row, idx, end)\n"
     "        c_ref_old",
     ["tests/test_guidance.py", "-k", "split_boundaries"]),
    ("min_new_tokens holds EOS one step too long", "cfg_triton/sampler.py",
     "if step < min_new_tokens and eos:", "if step <= min_new_tokens and eos:",
     ["tests/test_sampler.py", "-k", "eos_is_allowed"]),
    ("h statistics are not re-based when a maximum moves", "kernels/guidance.py",
     "h_max = h_max - (c_move + (1.0 - gamma) * ((u_ref - u_ref_old) - c_move))", "h_max = h_max",
     ["tests/test_guidance.py", "-k", "interpreter and (constant_added or matches_reference)"]),
    ("right padding is left in place", "cfg_triton/sampler.py",
     "if bool((mask[:, 1:] < mask[:, :-1]).any()):", "if False:",
     ["tests/test_sampler.py", "-k", "right_padded"]),
    ("the renormalization is dropped", "cfg_triton/torch_impl.py",
     "out.sub_(logsum_c + (1 - gamma) * (logsum_u - logsum_c))", "pass",
     ["tests/test_guidance.py", "-k", "torch and matches_reference"]),
    ("the 2x batch halves are swapped", "cfg_triton/sampler.py",
     "        return logits[0].chunk(2)\n", "        return logits[0].chunk(2)[::-1]\n",
     ["tests/test_sampler.py", "-k", "greedy_matches_transformers and batched"]),
]


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)
    # The installed package maps kernels/ to cfg_triton.kernels; the copy does the same by a link.
    (dest / "cfg_triton" / "kernels").symlink_to(dest / "kernels", target_is_directory=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="substrings of the mutation names to run")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(o in m[0] for o in args.only)]
    if args.list:
        print("\n".join(m[0] for m in chosen))
        return 0
    survived = []
    with tempfile.TemporaryDirectory(prefix="cfg-triton-mutants-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        for name, path, old, new, tests in chosen:
            source = copy / path
            original = source.read_text()
            if original.count(old) != 1:
                print(f"STALE   {name}: the original text is not found exactly once in {path}")
                survived.append(name)
                continue
            source.write_text(original.replace(old, new))
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *tests], cwd=copy, env=env, capture_output=True, text=True)
            source.write_text(original)
            caught = proc.returncode == 1  # tests failed (2+ would be an error of the run itself)
            if proc.returncode not in (0, 1):
                print(proc.stdout[-2000:] + proc.stderr[-2000:])
            print(f"{'CAUGHT ' if caught else 'SURVIVED'} {name} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            if not caught:
                survived.append(name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
