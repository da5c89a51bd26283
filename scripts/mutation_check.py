"""Plants one-line bugs in a temporary copy of the repository and checks that the tests catch each.

    .venv/bin/python scripts/mutation_check.py [--only NAME ...] [--list]

Each mutation replaces one line-sized piece of source text and runs only the tests meant to catch
it (in the copy, imported ahead of the installed package). A mutation that leaves those tests green
has survived: the suite has a hole there. Exits 1 if any survived. Takes about 10 minutes on 2
cores; not part of CI.
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
     "warp = dict(temperature=temperature,", "warp = dict(temperature=1.0,",
     ["tests/test_sampler.py", "-k", "temperature_reaches"]),
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
     "end = tl.minimum(start + split_len, V)\n    c_at, u_at = _references(c_row, u_row, start, end, BLOCK)\n"
     "    c_max, c_sum,",
     "end = tl.minimum(start + split_len + 1, V)\n    c_at, u_at = _references(c_row, u_row, start, end, BLOCK)\n"
     "    c_max, c_sum,",
     ["tests/test_guidance.py", "-k", "split_boundaries"]),
    ("min_new_tokens holds EOS one step too long", "cfg_triton/sampler.py",
     "if step < min_new_tokens and eos:", "if step <= min_new_tokens and eos:",
     ["tests/test_sampler.py", "-k", "eos_is_allowed"]),
    ("h statistics are not moved onto the split's maxima", "kernels/guidance.py",
     "h_top = h_top - (c_move + kappa * (u_move - c_move))", "h_top = h_top",
     ["tests/test_guidance.py", "-k", "interpreter and (constant_added or matches_reference)"]),
    ("h is never recomputed when its first-tile references were far off", "kernels/guidance.py",
     "if (tl.abs(c_move) > _REBASE) | (tl.abs(u_move) > _REBASE):", "if c_move != c_move:",
     ["tests/test_guidance.py", "-k", "far_below"]),
    ("right padding is left in place", "cfg_triton/sampler.py",
     "if bool((mask[:, 1:] < mask[:, :-1]).any()):", "if False:",
     ["tests/test_sampler.py", "-k", "right_padded"]),
    ("the renormalization is dropped", "cfg_triton/torch_impl.py",
     "out.sub_(logsum_c + (1 - gamma) * (logsum_u - logsum_c))", "pass",
     ["tests/test_guidance.py", "-k", "torch and matches_reference"]),
    ("the 2x batch halves are swapped", "cfg_triton/sampler.py",
     "        return logits[0].chunk(2)\n", "        return logits[0].chunk(2)[::-1]\n",
     ["tests/test_sampler.py", "-k", "greedy_matches_transformers and batched"]),
    # sampling.py: the torch path of `sample`
    ("dead rows are not found", "cfg_triton/sampling.py",
     'dead = ~(s_max[:, 0] > float("-inf"))', "dead = s_max[:, 0] != s_max[:, 0]",
     ["tests/test_sampling.py", "-k", "dead_and_poisoned and torch"]),
    ("top-k drops the tokens tied with the k-th", "cfg_triton/sampling.py",
     "keep &= (ranked >= kth) | ~on", "keep &= (ranked > kth) | ~on",
     ["tests/test_sampling.py", "-k", "draw_frequencies and top_k"]),
    ("top-p counts a token's own mass as before it", "cfg_triton/sampling.py",
     "before = torch.cumsum(mass, dim=-1) - mass", "before = torch.cumsum(mass, dim=-1)",
     ["tests/test_sampling.py", "-k", "draw_frequencies and top_p"]),
    ("min-p ignores the temperature", "cfg_triton/sampling.py",
     "s_max + t * torch.log(m)", "s_max + torch.log(m)",
     ["tests/test_sampling.py", "-k", "per_row_parameters"]),
    ("the draw ignores the temperature", "cfg_triton/sampling.py",
     "noisy = noise.mul_(t * rng.LN2).add_(ranked)", "noisy = noise.mul_(rng.LN2).add_(ranked)",
     ["tests/test_sampling.py", "-k", "draw_frequencies and none-normalized"]),
    ("dead rows draw a token", "cfg_triton/sampling.py",
     "tokens = torch.where(dead, -1, tokens)", "tokens = tokens",
     ["tests/test_sampling.py", "-k", "dead_and_poisoned and torch"]),
    ("banned tokens are re-masked only when every row has one", "cfg_triton/torch_impl.py",
     "if bool((c.amin(dim=-1) == NEG_INF).any()):", "if bool((c.amin(dim=-1) == NEG_INF).all()):",
     ["tests/test_sampling.py", "-k", "banned_tokens_in_some_rows and torch"]),
    # rng.py: the noise
    ("rows share one key", "cfg_triton/rng.py", "h = mix32(h ^ row)", "h = mix32(h ^ 0)",
     ["tests/test_sampling.py", "-k", "golden or seeds_and_steps"]),
    ("the uniform takes the wrong bits", "cfg_triton/rng.py", "out.copy_(h >> 9)", "out.copy_(h >> 8)",
     ["tests/test_sampling.py", "-k", "golden"]),
    ("token hashes drop the row's offset", "cfg_triton/rng.py",
     "return _mix32_(h.add_(offset[:, None]).bitwise_and_(_MASK))", "return _mix32_(h.bitwise_and_(_MASK))",
     ["tests/test_sampling.py", "-k", "kernel_noise or golden"]),
    ("steps 2**32 apart share their noise", "cfg_triton/rng.py",
     "return mix32(h ^ high) if high else h", "return h",
     ["tests/test_sampling.py", "-k", "seeds_and_steps or golden"]),
    # kernels/
    ("the kernels' uniform takes the low bits", "kernels/sampling.py",
     "u = ((h >> 9) | 0x3F800000)", "u = ((h & 0x7FFFFF) | 0x3F800000)",
     ["tests/test_sampling.py", "-k", "kernel_noise"]),
    ("the masked group's offset ignores the mix", "kernels/sampling.py",
     "            delta = mix * delta\n", "            delta = delta\n",
     ["tests/test_sampling.py", "-k", "two_groups and interpreter"]),
    ("the masked group's noisy winners are never looked for", "kernels/sampling.py",
     "    if noise or with_logprobs:\n        _run(_sample_masked_kernel,",
     "    if False:\n        _run(_sample_masked_kernel,",
     ["tests/test_sampling.py", "-k", "kernels_draw_the_torch_paths or same_token_for_every_split"]),
    ("the draw drops tokens at the threshold", "kernels/sampling.py",
     "    kept = s >= threshold\n", "    kept = s > threshold\n",
     ["tests/test_sampling.py", "-k", "kernels_draw_the_torch_paths or ranking_prefix or fast_accept"]),
    ("the fast accept keeps a draw ranked k+1", "kernels/sampling.py",
     "(_at(count, 0, PIVOTS) < k)", "(_at(count, 0, PIVOTS) <= k)",
     ["tests/test_sampling.py", "-k", "fast_accept"]),
    ("the fast accept checks top-p against all the mass under top-k", "kernels/sampling.py",
     "ok_p = tl.where(k_on, above < p * _at(mass, 1, PIVOTS), above < p * total)",
     "ok_p = above < p * total",
     ["tests/test_sampling.py", "-k", "fast_accept"]),
    ("a lane's best token forgets its column", "kernels/token_logprobs.py",
     "best_at + tl.arange(0, LANES) * GROUP", "best_at + tl.arange(0, LANES)",
     ["tests/test_grouping.py"]),
    ("the scoring kernel calls a poisoned row's target greedy", "kernels/token_logprobs.py",
     "greedy = valid & (bad == 0) & (best != _NO_INDEX)", "greedy = valid & (best != _NO_INDEX)",
     ["tests/test_logprobs.py", "-k", "poisoned_row and interpreter"]),
    # logprobs.py
    ("every chunk takes the first chunk's scales", "cfg_triton/logprobs.py",
     "torch_impl.guidance(c, u, _rows(gamma, part), _rows(mix, part)",
     "torch_impl.guidance(c, u, _rows(gamma, slice(0, step)), _rows(mix, slice(0, step))",
     ["tests/test_logprobs.py", "-k", "chunks"]),
    ("a dead row's target is greedy", "cfg_triton/logprobs.py",
     '(first == t[:, 0]) & (top > float("-inf"))', "(first == t[:, 0])",
     ["tests/test_logprobs.py", "-k", "masks_and_bad and torch"]),
    # scoring.py
    ("truncation keeps one token too few", "cfg_triton/scoring.py",
     "cond_rows.append((ctx + cont)[-(max_length + 1):-1])", "cond_rows.append((ctx + cont)[-max_length:-1])",
     ["tests/test_scoring.py", "-k", "truncation or long_inputs"]),
    ("the negative branch is not truncated", "cfg_triton/scoring.py",
     "uncond_rows.append((neg + cont)[-(max_length + 1):-1])", "uncond_rows.append((neg + cont)[:-1])",
     ["tests/test_scoring.py", "-k", "truncation or long_inputs"]),
    # transformers.py: the drop-in
    ("negatives are tiled, not interleaved, for return sequences", "cfg_triton/transformers.py",
     "self.negative = self.negative.repeat_interleave(copies, dim=0)",
     "self.negative = self.negative.repeat(copies, 1)",
     ["tests/test_transformers.py", "-k", "own_negatives"]),
    ("positional arguments are not seen", "cfg_triton/transformers.py",
     "call = {**dict(zip(names, args)), **kwargs}", "call = {**kwargs, 'inputs': args[0]}",
     ["tests/test_transformers.py", "-k", "positional"]),
    ("top-k sampling is taken for contrastive search", "cfg_triton/transformers.py",
     '((option("penalty_alpha") or 0) > 0 and (option("top_k") or 0) > 1, "contrastive search")',
     '((option("top_k") or 0) > 1, "contrastive search")',
     ["tests/test_transformers.py", "-k", "stays_paired"]),
    ("the paired forward skips the narrow matmul route", "cfg_triton/transformers.py",
     "    with narrow_linears(self):\n", "    with narrow_linears(torch.nn.Module()):\n",
     ["tests/test_transformers.py", "-k", "matmul_route"]),
    # harness.py
    ("an empty continuation is not greedy", "cfg_triton/harness.py",
     "answers = [(0.0, True)] * len(requests)", "answers = [(0.0, False)] * len(requests)",
     ["tests/test_harness.py", "-k", "empty_continuation"]),
    # The serving engines: liveness and exactness under pressure.
    ("a cancellation frees only one member of a pair", "cfg_triton/continuous.py",
     "                for member in members:\n                    self._manager.cancel_request(member)",
     "                for member in members[:1]:\n                    self._manager.cancel_request(member)",
     ["tests/test_stress.py", "-k", "random_schedules and not long"]),
    ("a request's step ignores the tokens a soft reset moved", "cfg_triton/continuous.py",
     "    return moved + len(state.generated_tokens)", "    return len(state.generated_tokens)",
     ["tests/test_serve.py", "-k", "soft_reset"]),
    ("guided log-probabilities are normalized over the rows", "cfg_triton/continuous.py",
     "guidance(cond[wanted], uncond[wanted], gamma, mix=mix).log_softmax(-1)",
     "guidance(cond[wanted], uncond[wanted], gamma, mix=mix).log_softmax(0)",
     ["tests/test_serve.py", "-k", "logprobs_bytes"]),
    ("a pair's admission counts its longest branch only", "cfg_triton/continuous.py",
     "pages = sum(_pages(self._cache, n) for n in lengths)", "pages = max(_pages(self._cache, n) for n in lengths)",
     ["tests/test_serve.py", "-k", "whole_pages"]),
    ("a unit needs a spare sequence slot", "cfg_triton/continuous.py",
     "if len(unit) > requests_left:", "if len(unit) >= requests_left:",
     ["tests/test_serve.py", "-k", "two_pairs_that_fit"]),
    ("the harness drops the negative prompt", "cfg_triton/harness.py",
     "negatives=negatives,\n", "negatives=None,\n",
     ["tests/test_harness.py", "-k", "negative_prompt_reaches_each"]),
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
            # Slow tests count too: a mutant's tests are chosen by name, whatever their mark.
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   "-m", "slow or not slow", *tests], cwd=copy, env=env,
                                  capture_output=True, text=True)
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
