"""The `cfg-triton` command: guided generation on a bundled or local model, streamed to the terminal."""
from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfg-triton", description="Classifier-free guidance for LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a continuation with CFG",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", help="the unconditional branch (default: last prompt token)")
    gen.add_argument("--system", help="system message; without --negative-prompt the negative branch "
                                      "is the same chat without it (system-prompt guidance)")
    gen.add_argument("--guidance-scale", type=float, default=1.5)
    gen.add_argument("--mix", type=float, default=None, help="interpolate toward the conditional "
                                                             "distribution (0.7 in the CFG paper)")
    gen.add_argument("--mode", choices=["batched", "sequential"], default="batched")
    gen.add_argument("--model", default="smollm2",
                     help="smollm2 | gemma3 (bundled), a .gguf file or a model folder")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--compare", action="store_true", help="also print the unguided continuation")
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


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch
    from transformers import TextStreamer

    from . import generate, models

    started = time.perf_counter()
    model, tokenizer = models.load(args.model)
    chat = not args.no_chat and getattr(tokenizer, "chat_template", None) is not None
    print(f"[{args.model} loaded in {time.perf_counter() - started:.1f} s]", file=sys.stderr)

    ids = _encode(tokenizer, args.prompt, args.system, chat)
    negative = None
    if args.negative_prompt is not None:
        negative = _encode(tokenizer, args.negative_prompt, args.system, chat)
    elif args.system:
        negative = _encode(tokenizer, args.prompt, None, chat)
    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p)

    def run(label, guidance_scale, mix):
        print(f"--- {label} ---", flush=True)
        generator = torch.Generator().manual_seed(args.seed)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        t0 = time.perf_counter()
        out = generate(model, ids, negative_input_ids=negative, guidance_scale=guidance_scale,
                       mix=mix, mode=args.mode, max_new_tokens=args.max_new_tokens,
                       generator=generator, streamer=streamer, **sampling)
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
