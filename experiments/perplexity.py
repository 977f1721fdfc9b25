# %% [markdown]
# # Perplexity of a checkpoint on a text file
#
# Loads a checkpoint directory (Hugging Face `MambaForCausalLM` or `mamba_ssm`
# layout, see `mamba_jax.from_pretrained`) and prints the perplexity and the bits
# per byte of a UTF-8 text file:
#
#     python experiments/perplexity.py CHECKPOINT_DIR TEXT_FILE [--tokenizer auto|bytes|PATH]
#
# Tokens come from the directory's `tokenizer.json` (with the `tokenizers`
# package) when there is one, otherwise from the bytes of the file (ids 0..255,
# for byte-level models). The token stream is cut into `--streams` contiguous
# segments evaluated side by side; each segment is read in chunks of
# `--chunk-len` tokens with the recurrent state carried from chunk to chunk, so
# every token is scored with its whole segment as context (exactly what a
# single forward over the segment gives) while memory stays bounded by one
# chunk: activations O(streams x chunk_len x d_model) and logits
# O(streams x chunk_len x vocab), whatever the file's length. The token ids
# themselves are held in RAM (4 bytes per token); `--max-bytes` reads less.
#
# Perplexity = exp(mean NLL per predicted token), the softmax taken over the
# model's `config.vocab_size` ids (padding rows beyond it excluded; for an HF
# checkpoint that is its `vocab_size`, as in transformers). Bits per byte =
# total NLL / ln 2 / UTF-8 bytes of the predicted tokens (from the tokenizer's
# offsets), which compares models with different
# tokenizers. The first token of each segment has no prediction.
#
# `--quick` evaluates only the first 4 kB.

# %%
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mamba_jax as mj

# %% Defaults
CHUNK_LEN = 512
STREAMS = 8
QUICK_BYTES = 4096


# %%
def tokenize(text: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, UTF-8 byte offset in ``text`` where each token ends, int64).

    The bytes of a run of tokens are the difference of end offsets: this counts
    each byte once even where a byte-level BPE splits one character over tokens
    (their character offsets then overlap).
    """
    if tokenizer is None:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return data.astype(np.int32), np.arange(1, data.size + 1, dtype=np.int64)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    char_bytes = np.fromiter((len(c.encode("utf-8")) for c in text), np.int64, count=len(text))
    cum = np.concatenate([np.zeros(1, np.int64), np.cumsum(char_bytes)])
    ends = cum[np.asarray(enc.offsets, np.int64).reshape(-1, 2)[:, 1]]
    return ids, np.maximum.accumulate(ends) if ends.size else ends


def read_tokens(path: Path, tokenizer, max_bytes: int | None, block_chars: int = 1 << 20):
    """Tokenize the file in blocks of about ``block_chars`` characters cut at line ends."""
    ids, ends, read = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        pending = ""
        while True:
            block = f.read(block_chars)
            text = pending + block
            if block:
                cut = text.rfind("\n") + 1
                text, pending = (text[:cut], text[cut:]) if cut > 0 else (text, "")
            else:
                pending = ""
            if max_bytes is not None:
                raw = text.encode("utf-8")[: max(0, max_bytes - read)]
                text = raw.decode("utf-8", errors="ignore")
            if text:
                i, e = tokenize(text, tokenizer)
                ids.append(i)
                ends.append(e + read)
                read += len(text.encode("utf-8"))
            if not block or (max_bytes is not None and read >= max_bytes):
                break
    if not ids:
        return np.zeros((0,), np.int32), np.zeros((0,), np.int64)
    return np.concatenate(ids), np.concatenate(ends)


@nnx.jit
def _chunk_nll(model, cache, inputs, targets, weights):
    logits, cache = model(inputs, cache=cache)
    logits = logits[..., : model.config.vocab_size].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), cache


def evaluate(model: mj.MambaLM, ids: np.ndarray, ends: np.ndarray, *, streams: int, chunk_len: int) -> dict:
    """Total NLL, predicted tokens and their bytes, over ``streams`` contiguous segments."""
    vocab = model.config.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids span [{ids.min()}, {ids.max()}] but the model has vocab_size={vocab}")
    seg = ids.size // streams
    if seg < 2:
        raise ValueError(f"{ids.size} tokens are too few for {streams} streams (need 2 per stream)")
    tokens = ids[: seg * streams].reshape(streams, seg)
    tends = ends[: seg * streams].reshape(streams, seg)
    n_chunks = -(-(seg - 1) // chunk_len)
    pad = n_chunks * chunk_len + 1 - seg  # pad the last chunk so every call has the same shape
    tokens = np.pad(tokens, ((0, 0), (0, pad)))
    weight = np.pad(np.ones((streams, seg - 1), np.float32), ((0, 0), (0, pad)))
    cache = model.init_cache(streams)
    total = jnp.zeros((), jnp.float32)
    for c in range(n_chunks):
        sl = slice(c * chunk_len, (c + 1) * chunk_len)
        tgt = slice(c * chunk_len + 1, (c + 1) * chunk_len + 1)
        nll, cache = _chunk_nll(
            model, cache, jnp.asarray(tokens[:, sl]), jnp.asarray(tokens[:, tgt]), jnp.asarray(weight[:, sl])
        )
        total = total + nll
    n_pred = streams * (seg - 1)
    n_bytes = int((tends[:, -1] - tends[:, 0]).sum())  # bytes of tokens 1 .. seg-1 of each stream
    return {"nll_sum": float(total), "tokens": n_pred, "bytes": n_bytes, "dropped_tail_tokens": int(ids.size - seg * streams)}


def load_tokenizer(directory: Path, choice: str):
    if choice == "bytes":
        return None
    path = directory / "tokenizer.json" if choice == "auto" else Path(choice)
    if not path.exists():
        if choice == "auto":
            return None
        raise FileNotFoundError(f"tokenizer file {path} not found")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(f"{path} needs the `tokenizers` package: pip install tokenizers (or use --tokenizer bytes)") from None
    return Tokenizer.from_file(str(path))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Perplexity and bits per byte of a checkpoint on a text file.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (HF or mamba_ssm layout)")
    p.add_argument("text", type=Path, help="UTF-8 text file")
    p.add_argument("--tokenizer", default="auto", help="'auto' (the directory's tokenizer.json, else bytes), 'bytes' or a tokenizer.json path")
    p.add_argument("--chunk-len", type=int, default=CHUNK_LEN)
    p.add_argument("--streams", type=int, default=STREAMS)
    p.add_argument("--max-bytes", type=int, default=None, help="evaluate only the first N bytes of the file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--quick", action="store_true", help=f"only the first {QUICK_BYTES} bytes")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.chunk_len < 1 or args.streams < 1:
        p.error("--chunk-len and --streams must be positive")
    max_bytes = QUICK_BYTES if args.quick and args.max_bytes is None else args.max_bytes

    t0 = time.perf_counter()
    model = mj.from_pretrained(args.checkpoint, dtype=jnp.dtype(args.dtype))
    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    ids, ends = read_tokens(args.text, tokenizer, max_bytes)
    res = evaluate(model, ids, ends, streams=args.streams, chunk_len=args.chunk_len)
    mean = res["nll_sum"] / res["tokens"]
    res.update(
        checkpoint=str(args.checkpoint),
        text=str(args.text),
        tokenizer="bytes" if tokenizer is None else args.tokenizer,
        nll_per_token=mean,
        perplexity=math.exp(mean),
        bits_per_byte=res["nll_sum"] / math.log(2) / max(res["bytes"], 1),
        seconds=time.perf_counter() - t0,
    )
    print(
        f"{res['tokens']:,} tokens ({res['bytes']:,} bytes, tokenizer: {res['tokenizer']}): "
        f"perplexity {res['perplexity']:.4f}, {res['nll_per_token']:.4f} nats/token, "
        f"{res['bits_per_byte']:.4f} bits/byte  [{res['seconds']:.1f} s]"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
