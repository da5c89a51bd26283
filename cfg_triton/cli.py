"""The `cfg-triton` command: guided generation on a bundled or local model, streamed to the terminal,
guided evaluation through lm-evaluation-harness (`cfg-triton eval`) and an OpenAI-compatible
server (`cfg-triton serve`)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from .processors import MAX_TEMPERATURE, MIN_TEMPERATURE


def _number(low=-math.inf, high=math.inf, *, low_open=False, kind=float):
    """An argparse type: a finite `kind` number in [low, high] (or (low, high] with `low_open`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text}")
        return value
    return parse


def _text(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the argument, exit status 2 (argparse's own, without the usage block)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cfg-triton", description="Classifier-free guidance for LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a continuation with CFG",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--prompt", required=True, type=_text)
    gen.add_argument("--negative-prompt", type=_text, help="the unconditional branch (default: last prompt token)")
    gen.add_argument("--system", help="system message; without --negative-prompt the negative branch "
                                      "is the same chat without it, which for chat templates with a "
                                      "default system prompt (SmolLM2) means with that default")
    gen.add_argument("--guidance-scale", type=_number(-1e6, 1e6), default=1.5)
    gen.add_argument("--mix", type=_number(0, 1), default=None, help="interpolate toward the conditional "
                                                             "distribution (0.7 in the CFG paper)")
    gen.add_argument("--mode", choices=["batched", "sequential"], default="batched")
    gen.add_argument("--model", default="smollm2",
                     help="smollm2 | gemma3 (bundled), a .gguf file or a model folder")
    gen.add_argument("--max-new-tokens", type=_number(1, 1e9, kind=int), default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=_number(MIN_TEMPERATURE, MAX_TEMPERATURE), default=None,
                     help="sampling temperature (1.0 when sampling)")
    gen.add_argument("--top-k", type=_number(1, 1e9, kind=int), default=None)
    gen.add_argument("--top-p", type=_number(0, 1, low_open=True), default=None)
    gen.add_argument("--min-p", type=_number(0, 1), default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--compare", action="store_true", help="also print the unguided continuation")

    ev = sub.add_parser("eval", help="zero-shot evaluation with CFG through lm-evaluation-harness",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--tasks", nargs="+", type=_text, default=["lambada_local"],
                    help="harness task names; local ones: lambada_local (needs --lambada), facts_mc")
    ev.add_argument("--lambada", metavar="PATH", help="lambada_test.jsonl for lambada_local")
    ev.add_argument("--guidance-scale", type=_number(-1e6, 1e6), nargs="+", default=[1.0, 1.5],
                    help="one harness run per value (1 is the unguided baseline)")
    ev.add_argument("--mix", type=_number(0, 1), default=None)
    ev.add_argument("--raw", action="store_true",
                    help="score the unnormalized combination of logits (the paper's scoring)")
    ev.add_argument("--negative-prompt", default=None,
                    help="unconditional context text (default: each context's last token)")
    ev.add_argument("--model", default="smollm2",
                    help="smollm2 | gemma3 (bundled), a model folder or a Hugging Face id")
    ev.add_argument("--limit", type=_number(1, 1e12, kind=int), default=None,
                    help="first N examples of each task")
    ev.add_argument("--batch-size", type=_number(1, 1e6, kind=int), default=16)
    ev.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ev.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAML files")
    ev.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ev.add_argument("--markdown", metavar="FILE", help="also write the results table as markdown")

    sv = sub.add_parser("serve", help="an OpenAI-compatible CFG server (continuous batching)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sv.add_argument("--model", default="smollm2",
                    help="smollm2 | gemma3 (bundled), a .gguf file or a model folder")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_number(0, 65535, kind=int), default=8000)
    sv.add_argument("--model-name", default=None, help="the id /v1/models reports (default: --model)")
    sv.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                    help="transformers' continuous batching (extra `serve`) or vLLM (extra `vllm`, "
                         "its own environment: scripts/install.sh --vllm)")
    # Engine sizes: the defaults differ by engine (`%(default).0s` keeps argparse from printing None).
    sv.add_argument("--page-size", type=_number(4, 1e6, kind=int), default=None,
                    help="tokens per KV-cache page (default: 64; with vLLM, vLLM's)%(default).0s")
    sv.add_argument("--num-blocks", type=_number(1, 1e9, kind=int), default=None,
                    help="KV-cache pages, each guided request holding two sequences (default: 256; with "
                         "vLLM, what its memory setting allows)%(default).0s")
    sv.add_argument("--max-batch-tokens", type=_number(2, 1e9, kind=int), default=None,
                    help="query tokens per engine step, longer prefills chunked (default: 256; with vLLM, "
                         "vLLM's)%(default).0s")
    sv.add_argument("--max-requests", type=_number(2, 1e6, kind=int), default=None,
                    help="sequences per engine step, a guided request counting two (default: 64; with "
                         "vLLM, vLLM's)%(default).0s")
    sv.add_argument("--vllm-arg", action="append", default=[], metavar="NAME=VALUE",
                    help="with --engine vllm: one of vLLM's engine arguments (repeatable; the value "
                         "read as JSON when it parses, else as a string), e.g. "
                         "gpu_memory_utilization=0.3 (on CPU: of host memory), dtype=float32, "
                         "enforce_eager=true, tensor_parallel_size=2")
    return parser


def _encode(tokenizer, text, system, chat):
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer((system + "\n" if system else "") + text, return_tensors="pt").input_ids
    return ids


def _warn(message):
    print(f"cfg-triton: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "eval":
        return _eval(args, parser)
    if args.command == "serve":
        return _serve(args, parser)
    return _generate(args, parser)


def _serve(args, parser) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        parser.error(f"cfg-triton serve needs its extra (pip install -e .[serve]): {e}")
    from . import models
    from .server import create_app

    if args.engine == "vllm":
        try:
            from .vllm import VllmEngine, check_vllm
            check_vllm()
        except ImportError as e:
            parser.error(f"--engine vllm needs vLLM (scripts/install.sh --vllm): {e}")
        try:
            folder = models.checkpoint(args.model)
        except (OSError, ValueError) as e:
            parser.error(f"argument --model: cannot load {args.model!r}: {str(e).splitlines()[0]}")
        sizes = dict(block_size=args.page_size, num_gpu_blocks_override=args.num_blocks,
                     max_num_batched_tokens=args.max_batch_tokens, max_num_seqs=args.max_requests)
        kwargs = {k: v for k, v in sizes.items() if v is not None}
        for item in args.vllm_arg:
            name, sep, value = item.partition("=")
            if not sep or not name:
                parser.error(f"argument --vllm-arg: expected NAME=VALUE, got {item!r}")
            try:
                kwargs[name] = json.loads(value)
            except ValueError:
                kwargs[name] = value
        try:
            engine = VllmEngine(folder, **kwargs)
        except TypeError as e:  # an argument AsyncEngineArgs does not have
            parser.error(f"argument --vllm-arg: {e}")
        described = f"vLLM, context {engine.context_length} tokens"
    else:
        if args.vllm_arg:
            parser.error("argument --vllm-arg: only with --engine vllm")
        try:
            from .continuous import TransformersEngine, check_engine
            check_engine()
        except ImportError as e:
            parser.error(f"cfg-triton serve needs its extra (pip install -e .[serve]): {e}")
        try:
            model, tokenizer = models.load(args.model)
        except (OSError, ValueError) as e:
            parser.error(f"argument --model: cannot load {args.model!r}: {str(e).splitlines()[0]}")
        pick = lambda value, default: default if value is None else value  # noqa: E731
        engine = TransformersEngine(model, tokenizer, num_blocks=pick(args.num_blocks, 256),
                                    page_size=pick(args.page_size, 64),
                                    max_batch_tokens=pick(args.max_batch_tokens, 256),
                                    max_requests=pick(args.max_requests, 64))
        described = f"KV cache: {engine.capacity_pages} pages of {engine.page_size} tokens"
    print(f"cfg-triton serve: {args.model} on http://{args.host}:{args.port}/v1 ({described})",
          file=sys.stderr, flush=True)
    import signal

    def stopped(signum, frame):
        raise _Stopped(signum)

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again with the handlers
    # it found: with the default ones the process would die there, before the engine is stopped.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stopped)
    try:
        uvicorn.run(create_app(engine, args.model_name or args.model), host=args.host, port=args.port,
                    log_level="warning")
    except _Stopped:
        pass
    finally:
        try:
            engine.stop()
        finally:
            _end_children()
    return 0


class _Stopped(Exception):
    """SIGTERM or SIGINT, after uvicorn's graceful shutdown."""


def _end_children(grace: float = 5.0):
    """Ends the processes this one started (an engine's workers) that are still alive: asked
    first (SIGTERM), then killed after `grace` seconds, so that no engine outlives the server."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(grace)
        if child.is_alive():
            child.kill()
            child.join(grace)


def _eval(args, parser) -> int:
    import json

    if "lambada_local" in args.tasks and args.lambada is None:
        parser.error("argument --lambada: task lambada_local needs the path of lambada_test.jsonl")
    try:
        from . import evaluation
        import lm_eval  # noqa: F401
    except ImportError:
        parser.error("cfg-triton eval needs lm-evaluation-harness: pip install -e .[eval]")
    try:
        evaluation.check_arguments(args.model, outputs=[("--json", args.json),
                                                        ("--markdown", args.markdown)])
        report = evaluation.run(args.model, args.tasks, args.guidance_scale, mix=args.mix,
                                normalize=not args.raw, negative_prompt=args.negative_prompt,
                                limit=args.limit, batch_size=args.batch_size,
                                lambada_path=args.lambada, include_path=args.include_path,
                                device=args.device, log=lambda m: print(m, file=sys.stderr))
    except evaluation.BadArgument as e:
        parser.error(f"argument {e.option}: {e.message.splitlines()[0]}")
    table = evaluation.markdown(report)
    print(table, end="")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


def _generate(args, parser) -> int:
    ignored = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p", "min_p")
               if getattr(args, k) is not None]
    if ignored and not args.sample:
        _warn(f"{', '.join(ignored)} only apply with --sample; decoding greedily")
    from transformers import TextStreamer

    from . import generate, models

    started = time.perf_counter()
    try:
        model, tokenizer = models.load(args.model)
    except (OSError, ValueError) as e:  # a missing path, a folder that holds no model, a bad GGUF
        parser.error(f"argument --model: cannot load {args.model!r}: {str(e).splitlines()[0]}")
    chat = not args.no_chat and getattr(tokenizer, "chat_template", None) is not None
    print(f"[{args.model} loaded in {time.perf_counter() - started:.1f} s]", file=sys.stderr)

    ids = _encode(tokenizer, args.prompt, args.system, chat)
    negative = None
    if args.negative_prompt is not None:
        negative = _encode(tokenizer, args.negative_prompt, args.system, chat)
    elif args.system:
        negative = _encode(tokenizer, args.prompt, None, chat)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max(ids.shape[1], 0 if negative is None else negative.shape[1]) > context:
        parser.error(f"argument --prompt: {ids.shape[1]} tokens do not fit the model's context of "
                     f"{context} tokens")
    if context and ids.shape[1] + args.max_new_tokens > context:
        _warn(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {args.max_new_tokens} "
              f"exceeds the model's context of {context} tokens; output past it is unreliable")
    sampling = dict(do_sample=args.sample, temperature=args.temperature or 1.0, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p)

    def run(label, guidance_scale, mix):
        print(f"--- {label} ---", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        t0 = time.perf_counter()
        unguided = guidance_scale == 1 and mix is None
        out = generate(model, ids, negative_input_ids=None if unguided else negative,
                       guidance_scale=guidance_scale,
                       mix=mix, mode=args.mode, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, streamer=streamer, **sampling)
        new = out.shape[1] - ids.shape[1]
        seconds = time.perf_counter() - t0
        print(f"[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s]", file=sys.stderr)

    run(f"guided (scale {args.guidance_scale}{', mix %g' % args.mix if args.mix is not None else ''}, "
        f"{args.mode})", args.guidance_scale, args.mix)
    if args.compare:
        # γ = 1 without a mix is the conditional distribution itself: the unguided continuation.
        run("unguided", 1.0, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
