"""The command line: ``python -m mamba_jax.generate`` (or ``python -m mamba_jax.generation``).

    python -m mamba_jax.generate --checkpoint DIR --prompt "Mamba is" --max-new-tokens 64 --temperature 0.8

The checkpoint is a Hugging Face directory (``config.json`` + weights, and
``tokenizer.json`` for text prompts; without it the prompt is comma separated
token ids). Tokens of the first prompt are streamed as they are made; the
stop token is ``eos_token_id`` of ``config.json`` unless ``--eos-token-id`` or
``--ignore-eos`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import jax

from mamba_jax.generation.decode import generate

__all__ = ["main"]


def _load_checkpoint(path):
    try:
        from mamba_jax import from_pretrained
    except ImportError as e:
        raise SystemExit(f"mamba_jax.from_pretrained is not available ({e}); cannot load {path}") from e
    return from_pretrained(path)


class _Printer:
    """Streams the tokens of row 0 to ``out``: decoded text with a tokenizer, comma
    separated ids otherwise. Text is decoded from the prompt plus everything so
    far and only the new suffix is written, so spaces and multi-byte characters
    that span tokens come out right."""

    def __init__(self, out, tokenizer, prompt_ids):
        self.out, self.tokenizer = out, tokenizer
        self.ids = list(prompt_ids)
        self.text = tokenizer.decode(self.ids) if tokenizer is not None else ""
        self.count = 0

    def start(self):
        self.out.write(self.text if self.tokenizer is not None else ",".join(map(str, self.ids)) + " -> ")
        self.out.flush()

    def __call__(self, step, tokens, finished):
        if finished[0]:
            return
        tok = int(tokens[0])
        self.ids.append(tok)
        if self.tokenizer is None:
            self.out.write(("," if self.count else "") + str(tok))
        else:
            text = self.tokenizer.decode(self.ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self.out.write(text[len(self.text) :] if text.startswith(self.text) else text)
                self.text = text
        self.count += 1
        self.out.flush()


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise SystemExit(f"--prompt must be comma separated token ids when the checkpoint has no tokenizer.json: {e}")
    if not ids:
        raise SystemExit("--prompt is empty")
    return ids


def main(argv: Sequence[str] | None = None, *, loader: Callable | None = None, out=None) -> int:
    """Entry point of ``python -m mamba_jax.generate``. ``loader(path) -> model``
    replaces :func:`mamba_jax.from_pretrained` (tests); output goes to ``out``."""
    parser = argparse.ArgumentParser(
        prog="python -m mamba_jax.generate",
        description="Generate text with a Mamba checkpoint (Hugging Face layout: config.json + model.safetensors, "
        "and tokenizer.json for text prompts).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", required=True, help="text (with tokenizer.json) or comma separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eos-token-id", type=int, default=None, help="stop token (default: eos_token_id of config.json, if any)"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="never stop early")
    parser.add_argument("--prefill-chunk", type=int, default=None)
    args = parser.parse_args(argv)
    out = sys.stdout if out is None else out

    if not os.path.isdir(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} is not a directory")
    model = (loader or _load_checkpoint)(args.checkpoint)

    tokenizer = None
    tok_path = os.path.join(args.checkpoint, "tokenizer.json")
    if os.path.exists(tok_path):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise SystemExit(f"{tok_path} needs the 'tokenizers' package: pip install tokenizers ({e})") from e
        tokenizer = Tokenizer.from_file(tok_path)
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        if not prompt_ids:
            raise SystemExit("--prompt encodes to no tokens")
    else:
        prompt_ids = _parse_ids(args.prompt)

    eos = args.eos_token_id
    if eos is None and not args.ignore_eos:
        cfg_path = os.path.join(args.checkpoint, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                eos = json.load(f).get("eos_token_id")
    if args.ignore_eos:
        eos = None
    pad = 0 if eos is None else (eos if isinstance(eos, int) else eos[0])

    printer = _Printer(out, tokenizer, prompt_ids)
    printer.start()
    try:
        generate(
            model,
            [prompt_ids],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=eos,
            pad_token_id=pad,
            key=jax.random.key(args.seed),
            callback=printer,
            prefill_chunk=args.prefill_chunk,
        )
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from e
    out.write("\n")
    out.flush()
    return 0
