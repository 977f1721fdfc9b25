# %% [markdown]
# # Byte-level language modelling: Mamba vs Transformer++ vs a hybrid
#
# Section 4.2 of the Mamba paper (arXiv 2312.00752, Fig. 4) trains Mamba and a
# strong "Transformer++" recipe (RoPE, SwiGLU MLP, RMSNorm, no biases; AdamW with
# betas (0.9, 0.95), weight decay 0.1, gradient clipping 1.0, linear warmup and
# cosine decay) at matched parameter counts (125M to 1.3B) on the same tokens of
# the Pile (GPT-NeoX tokenizer, context 2048, up to ~26B tokens), and finds
# Mamba matching or beating it. The Mamba-2 paper (arXiv 2405.21060, section 9.2.3)
# adds that interleaving a few attention layers into an SSM stack helps a little
# more.
#
# Here the same comparison runs on two shared CPU cores: bytes (vocabulary 256)
# of the Python standard library's own source (`ByteCorpus.from_stdlib`, about
# 11.8 MB train / 0.33 MB held out, split by file), three models of about 0.62M
# parameters (~200x smaller than the paper's smallest, 125M), context 256 bytes
# (8x shorter than 2048 tokens) and about 2M training bytes each (~1,200x fewer
# than the 2.5B tokens of the paper's smallest Chinchilla point; far from
# compute-optimal, so this is the early-training regime). All three see exactly
# the same batches and use the same optimizer recipe. The metric is validation
# bits per byte (loss in nats / ln 2) on a fixed 64 KB prefix of the held-out
# files; the unigram byte entropy of the training split is the trivial baseline.
#
# Parameter matching follows the paper's rule: a Mamba block (expand 2) has
# about 6 d^2 parameters (7 d^2 here, with x_proj and dt_proj at d = 128), an
# attention + SwiGLU block about 12 d^2, so Transformer++ gets 3 blocks where
# Mamba gets 5. The hybrid has 4 Mamba blocks and 2 attention blocks (layers 1
# and 4: each attention layer follows a Mamba layer, whose convolution and state
# already carry local context) and no MLP anywhere: the Mamba block already
# contains its own gated expansion (in_proj to 2 * expand * d, SiLU gate), and
# the Mamba-2 paper's hybrid ablations found that spending parameters on MLP
# blocks instead of SSM blocks did not help at equal size; without MLPs the
# hybrid stays "Mamba plus a few attention layers" and its parameter count
# lands next to the other two.
#
# Two sizes (d_model 128: ~0.62M parameters; d_model 256: ~2.4M, the same layer
# counts) and three seeds (the seed sets the initialisation and the batches).
# Within a size every model has the same parameters to within a few percent and
# sees the same tokens, so the same training FLOPs by the 6 N D rule (the JSON
# records 6 N D per run; attention's own l^2 term is left out of it). Each run
# is recorded in the results JSON as it finishes; a later invocation with the
# same hyperparameters takes recorded runs from there instead of training them
# again, and resumes an unfinished one from its checkpoints (`runs/04_byte_lm`).
# `--sizes`, `--models` and `--seeds` choose which runs this invocation may
# train (the report covers every recorded run); `--report-only` trains nothing.
#
# `--quick` trains tiny models for a handful of steps (a smoke test, no meaning).

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
from mamba_jax.data.text import ByteCorpus
from mamba_jax.train import Trainer, TrainConfig, evaluate, read_metrics

NAME = "04_byte_lm"

# %% Hyperparameters (full run; --quick shrinks them below)
# Per size: d_model, Mamba layers (~7 d^2 parameters each), Transformer++ blocks (attention 4 d^2 + SwiGLU
# MLP ~8 d^2 each), the hybrid's layers and attention positions (4 Mamba + 2 attention blocks, no MLP), heads.
SIZES = {
    "d128": dict(d_model=128, mamba_layers=5, tpp_layers=3, hybrid_layers=6, hybrid_attn=(1, 4), heads=4),
    "d256": dict(d_model=256, mamba_layers=5, tpp_layers=3, hybrid_layers=6, hybrid_attn=(1, 4), heads=8),
}
MODELS = ("mamba", "transformer_pp", "hybrid")
SEEDS = (0, 1, 2)
D_STATE = 16
SEQ_LEN = 256  # bytes of context
BATCH = 16  # sequences per step: 4,096 bytes per step
STEPS = 500  # ~2.05M training bytes per model
LEARNING_RATE = 2e-3
WARMUP = 50  # 10% of the steps
END_LR_RATIO = 0.1  # cosine to 10% of the peak
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
EVAL_EVERY = 100
EVAL_BATCH, EVAL_BATCHES = 32, 8  # 65,536 held-out bytes, the same prefix for every model and eval
LOG_EVERY = 5
CHECKPOINT_EVERY = 100


def _flags(parser):
    csv = lambda kind: (lambda text: tuple(kind(x) for x in text.split(",") if x))
    parser.add_argument("--sizes", type=csv(str), default=None, help=f"sizes to train, of {','.join(SIZES)}")
    parser.add_argument("--models", type=csv(str), default=None, help=f"models to train, of {','.join(MODELS)}")
    parser.add_argument("--seeds", type=csv(int), default=None, help="seeds to train (default 0,1,2)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table, figure and JSON; train nothing")


# %%
args = parse_args(NAME, __doc__, extra=_flags)
if args.quick:
    SIZES = {"tiny": dict(d_model=32, mamba_layers=2, tpp_layers=1, hybrid_layers=2, hybrid_attn=(1,), heads=2)}
    SEEDS = (0, 1)
    SEQ_LEN, BATCH, STEPS, WARMUP, EVAL_EVERY, EVAL_BATCH, EVAL_BATCHES, LOG_EVERY = 64, 4, 6, 2, 3, 8, 2, 2
if args.report_only and args.quick:
    raise SystemExit("--report-only reads the recorded results; a --quick run has none")
for flag, allowed in (("sizes", SIZES), ("models", MODELS), ("seeds", SEEDS)):
    unknown = set(getattr(args, flag) or ()) - set(allowed)
    if unknown:
        raise SystemExit(f"--{flag}: {sorted(unknown)} not among {list(allowed)}")
TRAIN_SIZES, TRAIN_MODELS, TRAIN_SEEDS = args.sizes or tuple(SIZES), args.models or MODELS, args.seeds or SEEDS


def model_config(size: str, model: str) -> mj.MambaConfig:
    z = SIZES[size]
    if model == "mamba":
        return mj.MambaConfig(d_model=z["d_model"], n_layer=z["mamba_layers"], vocab_size=256, d_state=D_STATE)
    if model == "transformer_pp":
        return mj.MambaConfig.transformer_pp(
            d_model=z["d_model"], n_layer=z["tpp_layers"], vocab_size=256, attn_num_heads=z["heads"]
        )
    return mj.MambaConfig(
        d_model=z["d_model"], n_layer=z["hybrid_layers"], vocab_size=256, d_state=D_STATE,
        attn_layer_idx=z["hybrid_attn"], attn_num_heads=z["heads"], d_intermediate=0,
    )


# %% Data: the stdlib's source bytes (GCIDE left out so the corpus is the same wherever dictd is installed)
corpus = ByteCorpus.from_stdlib(max_bytes=2_000_000 if args.quick else None, include_gcide=False)
print(f"corpus: {corpus.train.size:,} train bytes, {corpus.held_out.size:,} held-out bytes, "
      f"fingerprint {corpus.fingerprint[:12]}")
eval_set = list(corpus.eval_batches(SEQ_LEN, EVAL_BATCH, max_batches=EVAL_BATCHES))
eval_bytes = int(sum(b["weights"].sum() for b in eval_set))


def batch_fn_of(seed: int):
    def batch_fn(step: int) -> dict:
        """The batch of step ``step``: the same for every model of a seed, replayed exactly on resume."""
        return corpus.sample_batch(np.random.default_rng([seed, step]), BATCH, SEQ_LEN)

    return batch_fn


# %% Trivial baseline: unigram byte statistics
counts = np.bincount(corpus.train, minlength=256).astype(np.float64)
p_train = counts / counts.sum()
unigram_entropy = float(-np.sum(p_train[p_train > 0] * np.log2(p_train[p_train > 0])))
p_smooth = (counts + 1) / (counts.sum() + 256)  # add-one, so unseen held-out bytes cost finite bits
eval_targets = np.concatenate([b["targets"][b["weights"] > 0] for b in eval_set])
unigram_eval_bpb = float(-np.mean(np.log2(p_smooth[eval_targets])))
print(f"unigram baseline: train entropy {unigram_entropy:.3f} bits/byte, "
      f"cross-entropy on the eval subset {unigram_eval_bpb:.3f} bits/byte")

# %% Train: every (size, model, seed) not recorded yet, in that order
def hyperparameters():
    return {
        "sizes": SIZES, "d_state": D_STATE, "seq_len": SEQ_LEN, "batch": BATCH, "steps": STEPS,
        "tokens_per_model": STEPS * BATCH * SEQ_LEN, "learning_rate": LEARNING_RATE, "warmup_steps": WARMUP,
        "end_lr_ratio": END_LR_RATIO, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "grad_clip": GRAD_CLIP,
        "eval_every": EVAL_EVERY, "eval_batch": EVAL_BATCH, "eval_batches": EVAL_BATCHES,
        "batches": "corpus.sample_batch(np.random.default_rng([seed, step])): the same for every model of a seed",
    }


def recorded_runs() -> dict:
    """The runs of an earlier invocation's results JSON, by name, if its hyperparameters are these."""
    path = Path(args.out) / f"{NAME}.json"
    if args.quick or not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if json.loads(json.dumps(hyperparameters())) != previous.get("hyperparameters"):
        print(f"{path}: other hyperparameters, its runs are not reused", flush=True)
        return {}
    return {r["run"]: r for r in previous.get("runs", [])}


def train_one(size: str, model_name: str, seed: int) -> dict:
    config = model_config(size, model_name)
    model = mj.MambaLM(config, rngs=nnx.Rngs(seed))
    n_params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    print(f"\n{size}/{model_name}/seed{seed}: {config.n_layer} layers (attention at {list(config.attn_layer_idx)}), "
          f"d_model {config.d_model}, {n_params:,} parameters", flush=True)
    eval_seconds = [0.0]

    def eval_fn(m, _clock=eval_seconds):
        t = time.perf_counter()
        out = evaluate(m, eval_set)
        _clock[0] += time.perf_counter() - t
        return {**out, "bpb": out["loss"] / LN2}

    train_config = TrainConfig(
        total_steps=STEPS, learning_rate=LEARNING_RATE, warmup_steps=WARMUP, end_lr_ratio=END_LR_RATIO,
        weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], grad_clip=GRAD_CLIP, log_every=LOG_EVERY,
        eval_every=EVAL_EVERY, checkpoint_every=0 if args.quick else CHECKPOINT_EVERY, seed=seed,
    )
    workdir = Path(args.workdir) / size / model_name / f"seed{seed}"
    trainer = Trainer(model, train_config, workdir=workdir, progress=not args.quick, description=f"{size}/{model_name}")
    t0 = time.perf_counter()
    trainer.fit(batch_fn_of(seed), eval_fn=eval_fn)
    wall = time.perf_counter() - t0
    trainer.close()
    records = read_metrics(trainer.metrics_path)  # the whole run, across resumes
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    tokens_per_step = BATCH * SEQ_LEN
    run = {
        "run": f"{size}/{model_name}/seed{seed}", "size": size, "model": model_name, "seed": seed,
        "config": dataclasses.asdict(config),
        "params": n_params,
        "tokens_seen": STEPS * tokens_per_step,
        "train_flops_6nd": 6 * n_params * STEPS * tokens_per_step,
        "final_val_bpb": evals[-1]["bpb"],
        "final_val_accuracy": evals[-1]["accuracy"],
        # steady state: the median over logging intervals (compilation and evals are the outliers)
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train])),
        "wall_s_this_process": wall,
        "eval_s_this_process": eval_seconds[0],
        "curves": {
            "train": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["loss"],
                       "bpb": r["loss"] / LN2, "learning_rate": r["learning_rate"]} for r in train],
            "eval": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["loss"],
                      "bpb": r["bpb"], "accuracy": r["accuracy"]} for r in evals],
        },
    }
    print(f"{run['run']}: final val {run['final_val_bpb']:.3f} bits/byte, "
          f"{run['tokens_per_s']:,.0f} tokens/s, {wall:.0f} s", flush=True)
    return run


def summary(runs: dict) -> dict:
    """Per size and model: the seeds run, mean and sample standard deviation of the final val bits/byte."""
    out = {}
    for size in SIZES:
        for m in MODELS:
            done = [r for r in runs.values() if r["size"] == size and r["model"] == m]
            if not done:
                continue
            bpb = np.array([r["final_val_bpb"] for r in sorted(done, key=lambda r: r["seed"])])
            out[f"{size}/{m}"] = {
                "seeds": sorted(r["seed"] for r in done), "params": done[0]["params"],
                "final_val_bpb_mean": float(bpb.mean()),
                "final_val_bpb_std": float(bpb.std(ddof=1)) if bpb.size > 1 else None,
                "final_val_bpb_per_seed": bpb.tolist(),
                "tokens_per_s_median": float(np.median([r["tokens_per_s"] for r in done])),
            }
    return out


def report(runs: dict) -> dict:
    """Prints the table, writes the JSON and returns the summary."""
    everything = [f"{z}/{m}/seed{s}" for z in SIZES for m in MODELS for s in SEEDS]
    table = summary(runs)
    print(f"\n{'size/model':<22}{'params':>10}{'seeds':>8}{'val bpb (mean ± sd)':>22}{'tokens/s':>10}")
    for key, r in table.items():
        sd = "" if r["final_val_bpb_std"] is None else f" ± {r['final_val_bpb_std']:.3f}"
        print(f"{key:<22}{r['params']:>10,}{len(r['seeds']):>8}{r['final_val_bpb_mean']:>12.3f}{sd:<10}"
              f"{r['tokens_per_s_median']:>10,.0f}")
    print(f"{'unigram':<22}{256:>10,}{'-':>8}{unigram_eval_bpb:>12.3f}{'':<10}{'-':>10}   (train entropy {unigram_entropy:.3f})")
    write_results(args, NAME, {
        "paper": "Mamba (arXiv 2312.00752) section 4.2, Fig. 4: Mamba vs Transformer++ scaling on the Pile",
        "corpus": {**corpus.describe(), "eval_subset_bytes": eval_bytes,
                   "eval_subset": f"first {EVAL_BATCHES} batches of eval_batches(seq_len={SEQ_LEN}, batch_size={EVAL_BATCH})"},
        "hyperparameters": hyperparameters(),
        "scaled_down": (
            f"~50-200x fewer parameters (~0.62M and ~2.4M vs the paper's smallest 125M), context {SEQ_LEN} bytes vs "
            f"2048 tokens, {STEPS * BATCH * SEQ_LEN / 1e6:.2f}M training bytes per model vs 2.5B tokens at the paper's "
            "smallest Chinchilla point (~1,200x fewer; far from compute-optimal: the early-training regime), bytes of "
            "Python source instead of the Pile with a BPE tokenizer, one learning rate for all models (no tuning)."
        ),
        "unigram_baseline": {"train_entropy_bpb": unigram_entropy, "eval_subset_bpb_add_one": unigram_eval_bpb},
        "complete": all(k in runs for k in everything),
        "not_run": [k for k in everything if k not in runs],
        "summary": table,
        "runs": [runs[k] for k in everything if k in runs],
    })
    return table


LN2 = math.log(2.0)
runs = recorded_runs()
if runs:
    print(f"{len(runs)} runs taken from the results JSON: {', '.join(runs)}", flush=True)
for size in TRAIN_SIZES:
    for seed in TRAIN_SEEDS:
        for model_name in TRAIN_MODELS:
            key = f"{size}/{model_name}/seed{seed}"
            if key in runs or args.report_only:
                continue
            runs[key] = train_one(size, model_name, seed)
            report(runs)  # after every run: a stopped invocation loses nothing that finished
table = report(runs)

# %% Plot: validation bits per byte against training bytes (train loss faint)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

colors = {"mamba": "C0", "transformer_pp": "C3", "hybrid": "C2"}
labels = {"mamba": "Mamba", "transformer_pp": "Transformer++", "hybrid": "Hybrid (Mamba + 2 attn)"}
fig, axes = plt.subplots(1, len(SIZES), figsize=(6.5 * len(SIZES), 4.5), squeeze=False)
for ax, size in zip(axes[0], SIZES):
    for name in MODELS:
        seeds = sorted((r for r in runs.values() if r["size"] == size and r["model"] == name), key=lambda r: r["seed"])
        for i, r in enumerate(seeds):
            ev = r["curves"]["eval"]
            label = None
            if i == 0:
                t = table[f"{size}/{name}"]
                sd = "" if t["final_val_bpb_std"] is None else f" ± {t['final_val_bpb_std']:.3f}"
                label = f"{labels[name]}, {t['params'] / 1e6:.2f}M, {len(seeds)} seed(s): {t['final_val_bpb_mean']:.3f}{sd}"
            ax.plot([p["tokens"] for p in ev], [p["bpb"] for p in ev], "o-", ms=3, color=colors[name], alpha=0.7, label=label)
    ax.axhline(unigram_eval_bpb, color="gray", ls="--", lw=1, label=f"unigram bytes: {unigram_eval_bpb:.3f}")
    ax.set_xlabel("training bytes")
    ax.set_ylabel("held-out bits per byte (one line per seed)")
    ax.set_ylim(top=unigram_eval_bpb + 0.5)
    ax.set_title(f"{size}: d_model {SIZES[size]['d_model']}, context {SEQ_LEN}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
save_figure(args, NAME, fig)
