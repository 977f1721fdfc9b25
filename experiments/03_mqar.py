# %% [markdown]
# # 03 · Multi-Query Associative Recall: accuracy against width, Mamba vs attention
#
# **What the papers did.** Zoology (Arora et al. 2023, arXiv 2312.04927) introduced
# Multi-Query Associative Recall (MQAR): a sequence starts with key-value pairs, then every
# key is queried once later on and the model must output its value. Their sweep: vocabulary
# 8192, sequence lengths 64-512 with 4-64 key-value pairs, 2-layer models of width 64-512,
# with the learning rate tuned per point. Their finding: attention solves MQAR at every
# width, while gated-convolution / recurrent models need more width (more state) as the
# sequence gets longer. The Mamba-2 paper (Dao & Gu, arXiv 2405.21060, Fig. 8) runs a
# harder MQAR sweep (sequence lengths 256-1024) and finds Mamba-1 falling short of
# attention and of Mamba-2, whose larger state helps.
#
# **What we do.** Zoology's easiest cell, sequence length 64 with 4 key-value pairs, with a
# vocabulary of 1024 instead of 8192 (8x smaller, so each value token is seen ~8x more often
# in our few steps), 2-layer Mamba and 2-layer Transformer++ (RoPE attention + SwiGLU MLP),
# in three stages that each build on the last (every run is batch 32 for STEPS steps):
#
# 1. a learning-rate sweep (LRS) at width 64 for both models (Zoology sweeps it per point;
#    Okpekpe & Orvieto find Mamba's window of working rates narrow);
# 2. widths WIDTHS at each model's best rate from stage 1, then the other rates of RETUNE_LRS
#    (LRS and one rate above it) at each width whose run stayed below RETUNE_BELOW (a learning
#    rate tuned at one width need not work at another: Zoology tunes it per point);
# 3. longer sequences (LENGTHS, with more key-value pairs) at width 64 and the best rate.
#
# The results JSON and figure are rewritten after every run (``"complete": false`` until the
# last), and a killed invocation resumes each run from its checkpoints in ``--workdir``. A run
# already recorded in the results JSON with the same hyperparameters is taken from there and
# not trained again (so the sweep also resumes where the checkpoints are gone).
#
# Why not a much smaller vocabulary: the positions between queries hold random tokens
# from the whole vocabulary (as in Zoology), so with 64 tokens every key also shows up
# about once at random in the filler, followed by a random token, and "copy what followed
# the key last time" is wrong. Earlier runs at vocabulary 64 (800 and 2,500 steps) left
# every model, attention included, at ~25%: picking one of the 4 values of the context.
# Earlier runs at vocabulary 1024 with one rate (3e-3) and 2,500 steps left every model
# at or below 27%: recall forms abruptly, after a plateau longer than that.

# %%
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so `_common` imports however the script is started
from _common import parse_args, save_figure, write_results

import mamba_jax as mj
from mamba_jax.data import mqar
from mamba_jax.train import Trainer, TrainConfig, evaluate, read_metrics

NAME = "03_mqar"

# %% Hyperparameters
SEQ_LEN = 64  # Zoology: 64-512
NUM_KV_PAIRS = 4  # Zoology: 4-64
VOCAB = 1024  # Zoology: 8192
POWER_A = 0.01  # Zoology's default query-gap distribution (short gaps likely)
LRS = (1e-3, 3e-3, 1e-2)  # stage 1, at SWEEP_WIDTH
SWEEP_WIDTH = 64
WIDTHS = (32, 64, 128)  # stage 2 (Zoology: 64-512)
LENGTHS = ((128, 8), (256, 16))  # stage 3: (sequence length, key-value pairs) at SWEEP_WIDTH
RETUNE_BELOW = 0.5  # stage 2: a width at the 1/NUM_KV_PAIRS plateau gets the other rates
RETUNE_LRS = (*LRS, 3e-2)  # stage 2's rates, tried nearest the best rate first
N_LAYER = 2  # as in Zoology
D_STATE = 16  # Mamba-1's default state size per channel
ATTN_HEAD_DIM = 32  # attention heads = d_model / 32
BATCH = 32
STEPS = 8000
WARMUP = 100
WEIGHT_DECAY = 0.1
EVAL_EVERY = 500
EVAL_SIZE = 256  # held-out sequences (x NUM_KV_PAIRS scored queries), one fixed batch
CHECKPOINT_EVERY = 1000
SEED = 0

MODELS = {  # name -> config builder for a width
    "Mamba": lambda d: mj.MambaConfig(d_model=d, n_layer=N_LAYER, d_state=D_STATE, vocab_size=VOCAB),
    "Transformer++": lambda d: mj.MambaConfig.transformer_pp(
        d_model=d, n_layer=N_LAYER, vocab_size=VOCAB, attn_num_heads=max(1, d // ATTN_HEAD_DIM)
    ),
}

# What the papers report, qualitatively (see the "paper" entry of the JSON for sources).
PAPER = {
    "zoology": (
        "Attention solves MQAR at every model width and sequence length of the sweep; gated-convolution "
        "models (H3, Hyena, RWKV, ...) need a model dimension that grows with the sequence length to solve it "
        "(HazyResearch Zoology blog post 1, 2023-12-11; arXiv 2312.04927)."
    ),
    "mamba2_fig8": (
        "From memory of the Mamba-2 paper (arXiv 2405.21060, Fig. 8): on a harder MQAR (sequence lengths "
        "256-1024, widths 32-256, 2 layers) Mamba-1 falls well short of attention, especially at small width "
        "and long sequences, while Mamba-2 with a larger state (N=64, 256) does much better, even beating "
        "vanilla attention."
    ),
    "optimization": (
        "Okpekpe & Orvieto (arXiv 2508.19029) find that recurrent models (Mamba) succeed on MQAR only in a narrow "
        "window of learning rates while Transformers are robust to it: a single learning rate, as here, "
        "can under-rate Mamba."
    ),
}

# %%
args = parse_args(NAME, __doc__, extra=lambda p: p.add_argument(
    "--report-only", action="store_true", help="rewrite the table, figure and JSON from the recorded runs; train nothing"))
if args.quick and args.report_only:
    raise SystemExit("--report-only reads the recorded results; a --quick run has none")
if args.quick:  # a smoke run: tiny task, a few steps, no checkpoints
    SEQ_LEN, NUM_KV_PAIRS, VOCAB, BATCH, STEPS, WARMUP = 16, 2, 32, 8, 4, 1
    LRS, SWEEP_WIDTH, WIDTHS, LENGTHS = (1e-3, 3e-3), 16, (16, 32), ((32, 4),)
    RETUNE_LRS = LRS
    EVAL_EVERY, EVAL_SIZE, CHECKPOINT_EVERY = 2, 16, 0

data_key, eval_key = jax.random.key(SEED + 1), jax.random.key(10_000 + SEED)


@functools.lru_cache(maxsize=None)
def task(seq_len, kv_pairs):
    """(jitted batch_fn(step), the held-out batch) of one sequence length."""
    batch_fn = jax.jit(lambda step: mqar(jax.random.fold_in(data_key, step), BATCH, seq_len, kv_pairs, VOCAB, POWER_A))
    return batch_fn, mqar(eval_key, EVAL_SIZE, seq_len, kv_pairs, VOCAB, POWER_A)  # held out: a different key


runs = []


def hyperparameters():
    return {
        "seq_len": SEQ_LEN, "num_kv_pairs": NUM_KV_PAIRS, "vocab_size": VOCAB, "power_a": POWER_A,
        "learning_rates": list(LRS), "sweep_width": SWEEP_WIDTH, "widths": list(WIDTHS),
        "lengths": [list(x) for x in LENGTHS], "retune_below": RETUNE_BELOW, "retune_learning_rates": list(RETUNE_LRS),
        "n_layer": N_LAYER, "d_state": D_STATE,
        "attn_head_dim": ATTN_HEAD_DIM, "batch_size": BATCH, "steps": STEPS, "warmup_steps": WARMUP,
        "weight_decay": WEIGHT_DECAY, "eval_every": EVAL_EVERY, "eval_size": EVAL_SIZE, "seed": SEED,
    }


def recorded_runs():
    """The finished runs of an earlier invocation's results JSON, by run name, where every
    hyperparameter that shapes a single run matches this invocation's (the sweep's grid may differ)."""
    path = Path(args.out) / f"{NAME}.json"
    if args.quick or not path.exists():
        return {}
    previous = json.loads(path.read_text())
    grid = {"seq_len", "num_kv_pairs", "learning_rates", "sweep_width", "widths", "lengths", "retune_below",
            "retune_learning_rates"}
    mine = {k: v for k, v in hyperparameters().items() if k not in grid}
    theirs = previous.get("hyperparameters", {})
    if any(theirs.get(k) != v for k, v in mine.items()):
        print(f"{path}: other hyperparameters, its runs are not reused", flush=True)
        return {}
    return {r["run"]: r for r in previous.get("runs", [])}


recorded = recorded_runs()
missing = []  # runs --report-only skipped


def train(stage, name, d_model, lr, seq_len=SEQ_LEN, kv_pairs=NUM_KV_PAIRS):
    """Trains (or resumes, or only evaluates when finished) one run and records it."""
    run_name = f"{name.lower().rstrip('+')}_d{d_model}_lr{lr:g}_l{seq_len}"
    heading = f"\n== {stage}: {name}, d_model {d_model}, lr {lr:g}, length {seq_len} ({kv_pairs} pairs)"
    if run_name in recorded:  # neither the model nor the task is built for a recorded run
        runs.append({**recorded[run_name], "stage": stage})
        print(f"{heading}: taken from the results JSON (query accuracy {recorded[run_name]['final']['accuracy']:.1%})")
        return
    if args.report_only:
        missing.append(run_name)
        print(f"{heading}: not run (--report-only)")
        return
    batch_fn, eval_batch = task(seq_len, kv_pairs)
    model = mj.MambaLM(MODELS[name](d_model), rngs=nnx.Rngs(SEED))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{heading}: {n_params:,} parameters", flush=True)
    config = TrainConfig(total_steps=STEPS, learning_rate=lr, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY,
                         log_every=min(50, STEPS), eval_every=EVAL_EVERY, checkpoint_every=CHECKPOINT_EVERY, seed=SEED)
    trainer = Trainer(model, config, workdir=Path(args.workdir) / run_name, progress=not args.quick, description=run_name)
    t0 = time.perf_counter()
    trainer.fit(batch_fn, eval_fn=lambda m: evaluate(m, [eval_batch]))
    seconds = time.perf_counter() - t0
    trainer.close()
    final = evaluate(model, [eval_batch])
    curve = read_metrics(trainer.metrics_path, split="eval")
    runs.append({
        "stage": stage, "model": name, "d_model": d_model, "learning_rate": lr, "seq_len": seq_len,
        "num_kv_pairs": kv_pairs, "run": run_name, "n_params": int(n_params), "final": final,
        "best_accuracy": max([c["accuracy"] for c in curve] + [final["accuracy"]]),
        "train_seconds": seconds,  # this invocation only (a resumed run counts the rest)
        "eval_curve": curve,
    })
    print(f"{name} d{d_model} lr {lr:g} l{seq_len}: query accuracy {final['accuracy']:.1%}, all queries right "
          f"{final['sequence_accuracy']:.1%}, {seconds:.0f} s", flush=True)
    report(complete=False)


def best_lr(name):
    mine = [r for r in runs if r["stage"] == "lr" and r["model"] == name]
    return max(mine, key=lambda r: (r["final"]["accuracy"], -r["learning_rate"]))["learning_rate"]


def width_accuracy(name, d_model):
    """The best final query accuracy of ``name`` at width ``d_model`` (length SEQ_LEN) over the rates tried."""
    return max(r["final"]["accuracy"] for r in runs if r["model"] == name and r["d_model"] == d_model
               and r["seq_len"] == SEQ_LEN and (r["stage"] == "width" or r["learning_rate"] == best_lr(name)))


def report(complete):
    """The table, the figure and the JSON of the runs so far."""
    print(f"\n{'stage':6s} {'model':14s} {'d':>4s} {'lr':>7s} {'len':>4s} {'query acc':>10s} {'seq acc':>8s}")
    for r in runs:
        print(f"{r['stage']:6s} {r['model']:14s} {r['d_model']:4d} {r['learning_rate']:7g} {r['seq_len']:4d} "
              f"{r['final']['accuracy']:10.1%} {r['final']['sequence_accuracy']:8.1%}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(MODELS):
        for ax, stage, key in ((axes[0], "lr", "learning_rate"), (axes[1], "width", "d_model"), (axes[2], "length", "seq_len")):
            best = {}  # x -> the best final accuracy over the runs at x (stage 2 retunes some widths)
            for r in runs:
                if r["model"] == name and (r["stage"] == stage or (
                        stage != "lr" and r["stage"] == "lr" and r["learning_rate"] == best_lr(name))):
                    best[r[key]] = max(best.get(r[key], 0.0), 100 * r["final"]["accuracy"])
            ax.plot(sorted(best), [best[x] for x in sorted(best)], "o-", color=f"C{i}", label=name)
    for ax, label in zip(axes, ("learning rate (d_model %d, length %d)" % (SWEEP_WIDTH, SEQ_LEN),
                                "d_model (best rate tried, length %d)" % SEQ_LEN,
                                "sequence length (d_model %d, best rate)" % SWEEP_WIDTH)):
        ax.set_xscale("log", base=2 if "rate" not in label.split(" (")[0] else 10)
        ax.set(xlabel=label, ylabel="held-out query accuracy (%)", ylim=(0, 102))
        ax.axhline(100 / NUM_KV_PAIRS, color="k", lw=0.5, ls=":")
    axes[0].legend()
    fig.suptitle(f"MQAR, vocabulary {VOCAB}, {N_LAYER} layers, {STEPS} steps of batch {BATCH}"
                 + ("" if complete else " (incomplete)"))
    save_figure(args, NAME, fig)
    plt.close(fig)
    reached = {r["run"] for r in runs}
    write_results(args, NAME, {
        "complete": complete,
        "hyperparameters": hyperparameters(),
        # the earlier invocation's runs this one has not reached yet stay in the file
        "runs": runs + [r for name, r in recorded.items() if name not in reached],
        "baseline_accuracy": {
            "uniform_over_values": 1 / (VOCAB - VOCAB // 2),
            "random_value_of_the_context": 1 / NUM_KV_PAIRS,  # the plateau before key-value binding is learned
        },
        "paper": PAPER,
        "scaled_down": (
            f"Zoology's sweep at CPU scale: vocabulary {VOCAB} instead of 8192, widths {list(WIDTHS)} (Zoology: 64-512), "
            f"{STEPS} steps of batch {BATCH} (~{STEPS * BATCH // 1000}K sequences, each seen once; Zoology: 100K "
            f"training sequences for up to 64 epochs), learning rates {list(LRS)} swept at width {SWEEP_WIDTH}, "
            f"{list(RETUNE_LRS)} tried only at widths the best rate left below {RETUNE_BELOW:.0%}, one seed per point."
        ),
    })


# %% Stage 1: learning rates at width SWEEP_WIDTH
for name in MODELS:
    for lr in LRS:
        train("lr", name, SWEEP_WIDTH, lr)

# %% Stage 2: widths at the best rate, then the other rates at the widths it left at the plateau
# (the rate nearest the best one first, at every such width, then the next; a width stops once a rate works)
for name in MODELS:
    for d_model in WIDTHS:
        if d_model != SWEEP_WIDTH:
            train("width", name, d_model, best_lr(name))
    for lr in sorted(RETUNE_LRS, key=lambda r: abs(math.log(r / best_lr(name))))[1:]:
        for d_model in WIDTHS:
            if d_model != SWEEP_WIDTH and width_accuracy(name, d_model) < RETUNE_BELOW:
                train("width", name, d_model, lr)

# %% Stage 3: longer sequences at the best rate
for name in MODELS:
    for seq_len, kv_pairs in LENGTHS:
        train("length", name, SWEEP_WIDTH, best_lr(name), seq_len, kv_pairs)

report(complete=not missing)
