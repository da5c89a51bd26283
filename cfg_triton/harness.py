"""CFG for lm-evaluation-harness: the model `cfg`, local tasks, and the harness command line.

    python -m cfg_triton.harness run --model cfg \\
        --model_args pretrained=smollm2,guidance_scale=1.5 --tasks lambada_local --include_path DIR

lm-evaluation-harness (0.4.x) discovers no third-party models, so its own `lm_eval` command cannot
see `cfg`; `python -m cfg_triton.harness` is that command with `cfg` registered (and so is
`accelerate launch -m cfg_triton.harness ...` for data-parallel runs). Importing this module
registers `cfg` for `lm_eval.simple_evaluate` too.

`CFGLM` subclasses the harness's `HFLM`, so loading, devices, `accelerate` data parallelism, chat
templates and tokenization are the harness's own. Only the two model calls change:
`loglikelihood` scores through `cfg_triton.scoring.score_tokens` (the unconditional branch is the
context's last token, or `negative_prompt`), and `generate_until` generates through
`cfg_triton.generate`. The optional extra `eval` installs the harness: `pip install -e .[eval]`.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from . import models
from .sampler import generate
from .scoring import score_tokens

_TASK_DATA = Path(__file__).resolve().parent / "eval_tasks"
LOCAL_TASKS = ("lambada_local", "facts_mc")

_LAMBADA_YAML = """\
task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
"""

_FACTS_YAML = """\
task: facts_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_local_tasks(folder, lambada_path=None) -> list[str]:
    """Writes the local task configs into `folder` (for `TaskManager(include_path=folder)` or the
    harness's `--include_path`); returns the task names written.

    `facts_mc`: 24 four-way multiple-choice questions shipped with this package. `lambada_local`:
    LAMBADA in the `lambada_openai` form (context = text up to its last space, target = space +
    last word) from a local `lambada_test.jsonl`, written only when `lambada_path` is given.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "facts_mc.yaml").write_text(_FACTS_YAML.format(path=_TASK_DATA / "facts_mc.jsonl"))
    names = ["facts_mc"]
    if lambada_path is not None:
        path = Path(lambada_path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no LAMBADA file at {path}")
        (folder / "lambada_local.yaml").write_text(
            _LAMBADA_YAML.format(path=path, source=f"sha256 {sha256(path)}"))
        names.insert(0, "lambada_local")
    return names


def _optional_float(name, value):
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


@register_model("cfg", "cfg-triton")
class CFGLM(HFLM):
    """The harness's HF causal LM with classifier-free guidance on both request types.

    Model arguments besides `HFLM`'s: `guidance_scale` (γ, default 1.5), `mix` (α of the
    interpolated variant; default none), `normalize` (default true; false scores the raw
    combination of logits), `negative_prompt` (text of the unconditional context; default: each
    context's last token, as the CFG paper evaluated). `pretrained` may also name a bundled model
    (`smollm2`, `gemma3`); `device` defaults to CUDA when present, else the CPU.
    """

    def __init__(self, pretrained="smollm2", guidance_scale=1.5, mix=None, normalize=True,
                 negative_prompt=None, device=None, batch_size=16, **kwargs):
        if isinstance(pretrained, str) and pretrained in models.BUNDLED:
            pretrained = str(models.checkpoint(pretrained))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, device=device, batch_size=batch_size, **kwargs)
        self.guidance_scale = _optional_float("guidance_scale", guidance_scale)
        if self.guidance_scale is None:
            raise ValueError("guidance_scale must be a number")
        self.mix = _optional_float("mix", mix)
        if self.mix is not None and not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {self.mix}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be true or false, got {normalize!r}")
        self.normalize = normalize
        self.negative_prompt = negative_prompt

    def _scoring_batch_size(self, override_bs=None) -> int:
        size = override_bs or self.batch_size
        return size if isinstance(size, int) and size > 0 else 16

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        """`requests`: ((context, continuation) strings or None, context ids, continuation ids);
        returns (summed guided log-probability, whether every token is the guided argmax)."""
        # An empty continuation (an empty multiple-choice option) has probability 1 and is its own
        # greedy continuation, as HFLM scores it: only the others are scored.
        answers = [(0.0, True)] * len(requests)
        scored = [i for i, r in enumerate(requests) if len(r[2])]
        negatives = None
        if self.negative_prompt is not None:
            negative = self.tok_encode(self.negative_prompt, add_special_tokens=False)
            negatives = [negative] * len(scored)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests") as bar:
            bar.update(len(requests) - len(scored))
            if scored:
                scores = score_tokens(self.model, [requests[i][1] for i in scored],
                                      [requests[i][2] for i in scored], negatives=negatives,
                                      guidance_scale=self.guidance_scale, mix=self.mix,
                                      normalize=self.normalize,
                                      batch_size=self._scoring_batch_size(override_bs),
                                      max_length=self.max_length, progress=bar.update)
                for i, lp, top in zip(scored, scores.logprobs, scores.greedy):
                    answers[i] = (float(lp), bool(top))
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:  # rolling windows carry no key; the harness caches them whole
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def _model_generate(self, context, max_length, stop, attention_mask=None, **generation_kwargs):
        """Guided generation for `generate_until`; the harness cuts the text at `stop` after."""
        do_sample = bool(generation_kwargs.pop("do_sample", False))
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        top_k, top_p = generation_kwargs.pop("top_k", None), generation_kwargs.pop("top_p", None)
        if generation_kwargs:
            raise ValueError(f"cfg: unsupported generation arguments {sorted(generation_kwargs)}")
        negative = None
        if self.negative_prompt is not None:
            ids = self.tok_encode(self.negative_prompt, add_special_tokens=False)
            negative = torch.tensor([ids] * context.shape[0], dtype=torch.long, device=context.device)
        sample = do_sample and temperature > 0
        return generate(self.model, context, attention_mask, negative_input_ids=negative,
                        guidance_scale=self.guidance_scale, mix=self.mix,
                        max_new_tokens=max(0, max_length - context.shape[1]), do_sample=sample,
                        temperature=temperature if sample else 1.0, top_k=top_k, top_p=top_p,
                        pad_token_id=self.tokenizer.pad_token_id)


def main(argv=None) -> None:
    """The harness's command line, with the `cfg` model registered (this module's import)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
