# %% [markdown]
# # 08 · States: linear probes over layers and time, and each channel's half-life
#
# **The question** (STATES-IDEAS 3.1, 7.1, 7.3): the state is "such an obvious thing to
# focus on" for interpretability. What can a linear probe read from each layer's state, and
# how long after it was written? And how long does each channel remember, read straight off
# the learned `dt` and `A`?
#
# **What we do.** With the fact model of experiment 06: sequences of filler with one fact
# `FACT k1 k2 v` at position FACT_POS, then filler up to DELAYS[-1] tokens after the value.
# The states at each delay come from prefilling the sequence piece by piece with the cache. Per layer and per
# delay (tokens since the value was written), ridge probes on the SSM state read
# (a) the value `v` (32 classes), (b) the key's first token `k1` (96 classes), held out.
# Controls: the same probes on the model at initialisation, and on shuffled labels.
# Half-lives: `ln 2 / (softplus(dt_bias) |A|)` per state element (zero input), trained vs
# initialisation, and measured on fact documents from the decay product of a whole
# document (`segment`), for the trained model.

# The fact model trains (or resumes) in `runs/states_fact_model` on the first of 06-08 that runs (about
# 7 minutes on 2 CPU cores); the others reuse it.

# %%
import sys
from pathlib import Path

import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fact_model, fact_model_flags, parse_args, save_figure, write_results

import mamba_jax as mj
from mamba_jax import states
from mamba_jax.states import facts, probes

NAME = "08_states_probes"

# %% Hyperparameters
TASK = facts.FactTaskConfig()  # Mamba-1, d_model 64, 3 layers; 10k steps of batch 32 (6k on short documents)
FACT_POS = 8
DELAYS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)  # tokens after the value (training documents are 64 long)
N_TRAIN, N_TEST = 1536, 512
ALPHA = 10.0
SEED = 4

# %%
args = parse_args(NAME, __doc__, extra=fact_model_flags)
if args.quick:
    DELAYS, N_TRAIN, N_TEST = (0, 2, 4), 48, 16
TASK, trained, model_step = fact_model(args, TASK)
init = mj.MambaLM(TASK.model_config(), rngs=nnx.Rngs(TASK.seed))  # the same initialisation, untrained
vocab = TASK.vocab

# %% Sequences: one fact at FACT_POS, filler around it
rng = np.random.default_rng(SEED)
n = N_TRAIN + N_TEST
length = FACT_POS + 4 + max(DELAYS)
tokens = rng.integers(vocab.filler_start, vocab.size, (n, length)).astype(np.int32)
keys = rng.choice(vocab.n_keys, n, replace=False)
values = rng.integers(vocab.value_start, vocab.value_start + vocab.n_values, n)
tokens[:, FACT_POS] = facts.FACT
tokens[:, FACT_POS + 1 : FACT_POS + 3] = vocab.key_tokens(keys)
tokens[:, FACT_POS + 3] = values
k1 = vocab.key_tokens(keys)[:, 0]
shuffled = rng.permutation(values)


def probe_table(model):
    """accuracy[target][layer][delay] of held-out ridge probes on the SSM state."""
    cache, pos = model.init_cache(n), 0
    feats = []  # per delay: the cache right after token FACT_POS + 3 + d
    for d in DELAYS:
        t = FACT_POS + 4 + d
        cache = states.run(model, tokens[:, pos:t], cache)[1]
        pos = t
        feats.append(cache)
    out = {"value": [], "key_first_token": [], "value_shuffled_labels": []}
    for layer in range(model.config.n_layer):
        rows = {k: [] for k in out}
        for c in feats:
            x = probes.features(c, layer)
            for target, y in (("value", values), ("key_first_token", k1), ("value_shuffled_labels", shuffled)):
                rows[target].append(probes.ridge_classifier(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], alpha=ALPHA))
        for k in out:
            out[k].append(rows[k])
    return out


tables = {"trained": probe_table(trained), "init": probe_table(init)}
for name, tab in tables.items():
    for target, acc in tab.items():
        for layer, row in enumerate(acc):
            print(f"{name:7s} {target:22s} layer {layer}: " + " ".join(f"{a:.2f}" for a in row), flush=True)

# %% Half-lives
def summary(hl):
    hl = np.asarray(hl, np.float64).ravel()
    return {"median": float(np.median(hl)), "p10": float(np.percentile(hl, 10)), "p90": float(np.percentile(hl, 90)),
            "max": float(hl.max()), "fraction_over_doc_len": float((hl > TASK.doc_len).mean()),
            "fraction_over_1000": float((hl > 1000).mean())}


hl_trained, hl_init = states.half_lives(trained), states.half_lives(init)
doc_ids = jnp.asarray(facts.make_docs(np.random.default_rng(SEED + 1), vocab, 16 if args.quick else 256, TASK.doc_len,
                                     TASK.facts_per_doc).tokens)
seg = states.segment(trained, doc_ids)
hl_measured = [states.measured_half_lives(p, seg.length) for p in seg.decay]
half_lives = {
    "zero_input_trained": [summary(h) for h in hl_trained],
    "zero_input_init": [summary(h) for h in hl_init],
    "measured_on_fact_documents_trained": [summary(h) for h in hl_measured],
}
for k, v in half_lives.items():
    print(k, [f"median {s['median']:.1f} p90 {s['p90']:.1f} >doc {s['fraction_over_doc_len']:.2f}" for s in v])

# %% Results
write_results(args, NAME, {
    "model_trained_steps": model_step,
    "hyperparameters": {"fact_pos": FACT_POS, "delays": list(DELAYS), "n_train": N_TRAIN, "n_test": N_TEST,
                        "alpha": ALPHA, "seed": SEED, "train_doc_len": TASK.doc_len},
    "chance": {"value": 1 / vocab.n_values, "key_first_token": 1 / vocab.key_alphabet},
    "probe_accuracy": tables,
    "half_lives": half_lives,
})
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for layer in range(TASK.n_layer):
    axes[0].plot(DELAYS, tables["trained"]["value"][layer], "o-", label=f"trained, layer {layer}")
    axes[0].plot(DELAYS, tables["init"]["value"][layer], "x:", label=f"init, layer {layer}")
    axes[1].plot(DELAYS, tables["trained"]["key_first_token"][layer], "o-", label=f"trained, layer {layer}")
axes[0].axhline(1 / vocab.n_values, color="gray", lw=0.8)
axes[1].axhline(1 / vocab.key_alphabet, color="gray", lw=0.8)
for ax, t in zip(axes[:2], ["probe reads the value v", "probe reads the key's first token"]):
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("tokens since the value was written")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(t)
    ax.legend(fontsize=7)
for layer in range(TASK.n_layer):
    axes[2].hist(np.log10(np.asarray(hl_trained[layer]).ravel()), bins=40, histtype="step", label=f"trained layer {layer}")
    axes[2].hist(np.log10(np.clip(hl_measured[layer].ravel(), 1e-3, None)), bins=40, histtype="step", ls="--",
                 label=f"measured layer {layer}")
axes[2].hist(np.log10(np.asarray(hl_init[0]).ravel()), bins=40, histtype="step", color="k", label="init layer 0")
axes[2].set_xlabel("log10 half-life (tokens)")
axes[2].set_title("per-channel half-lives")
axes[2].legend(fontsize=7)
save_figure(args, NAME, fig)  # --quick: into its temporary --out
