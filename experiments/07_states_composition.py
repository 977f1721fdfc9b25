# %% [markdown]
# # 07 · States: what survives when states are combined
#
# **The question** (STATES-IDEAS 2.4, "from mixture of experts to mixture of states"): can
# states computed separately be combined? For one linear recurrent layer there is an exact
# rule: the state after A then B is `P_B * h_A + h_B`, with `P_B` the product of B's decays
# and `h_B` the state B reaches from zero (`mamba_jax.states.compose`). In a deep model the
# inputs of layer 2 and up during B depend on A, so the rule is only approximate there.
#
# **What we measure**, against the state after running the concatenation A+B:
#
# - per layer, the relative error of the SSM state for: the exact rule with B run after A's
#   convolution tail (`compose(h_A, segment(B, start=A))`), the rule with B computed on its
#   own (`segment(B)`, a precomputed segment), a convex mixture `0.5 h_A + 0.5 h_B`, and B
#   alone (`h_B`, forgetting A);
# - the KL divergence of the next-token distribution after a query (true vs combined);
# - for the trained fact model, whether the combined state still answers questions about the
#   facts of A and of B (accuracy), with A alone and B alone as references.
#
# Models: the fact model of experiment 06 (Mamba-1, 3 layers, trained), the same
# architecture at initialisation, a 3-layer Mamba-2 and a 6-layer Mamba-1 at initialisation.

# The fact model trains (or resumes) in `runs/states_fact_model` on the first of 06-08 that runs (about
# 7 minutes on 2 CPU cores); the others reuse it.

# %%
import sys
from pathlib import Path

import jax
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
from mamba_jax.states import facts

NAME = "07_states_composition"

# %% Hyperparameters
TASK = facts.FactTaskConfig()  # Mamba-1, d_model 64, 3 layers; 10k steps of batch 32 (6k on short documents)
PAIRS = 256  # (A, B) document pairs
SEED = 3
RANDOM_MODELS = {
    "mamba1_init": lambda t: t.model_config(),
    "mamba2_init": lambda t: t.model_config().replace(layer="mamba2", d_state=32, headdim=16, chunk_size=16),
    "mamba1_init_6_layers": lambda t: t.model_config().replace(n_layer=6),
}

# %%
args = parse_args(NAME, __doc__, extra=fact_model_flags)
if args.quick:
    PAIRS = 8
TASK, trained, model_step = fact_model(args, TASK)
models = {"mamba1_trained": trained}
for name, cfg in RANDOM_MODELS.items():
    models[name] = mj.MambaLM(cfg(TASK), rngs=nnx.Rngs(0))
vocab, V = TASK.vocab, TASK.vocab.size
docs = facts.make_docs(np.random.default_rng(SEED), vocab, 2 * PAIRS, TASK.doc_len, TASK.facts_per_doc)
a_ids, b_ids = jnp.asarray(docs.tokens[:PAIRS]), jnp.asarray(docs.tokens[PAIRS:])
# one question per pair about A's first fact and one about B's first fact
q_a = facts.query_tokens(vocab, docs.keys[:PAIRS, 0])
q_b = facts.query_tokens(vocab, docs.keys[PAIRS:, 0])
ans_a, ans_b = docs.values[:PAIRS, 0], docs.values[PAIRS:, 0]


def prefill(model, ids, cache=None):
    return states.run(model, ids, model.init_cache(ids.shape[0]) if cache is None else cache)[1]


def next_token(model, cache, q):
    logits, _ = states.run(model, q, cache)
    return jax.nn.log_softmax(logits[:, -1, :V].astype(jnp.float32), -1)


def kl(p_log, q_log):
    return float(jnp.mean(jnp.sum(jnp.exp(p_log) * (p_log - q_log), -1)))


# %% Measure
results = {}
for name, model in models.items():
    after_a = prefill(model, a_ids)
    b_alone = prefill(model, b_ids)
    exact = prefill(model, b_ids, after_a)
    combined = {
        "compose_exact_conv": states.compose(after_a, states.segment(model, b_ids, start=after_a)),
        "compose_independent": states.compose(after_a, states.segment(model, b_ids)),
        "mix_half": states.mix([after_a, b_alone], [0.5, 0.5]),
        "b_alone": b_alone,
    }
    out = {"layer_rel_error": {}, "next_token_kl": {}, "accuracy_on_A": {}, "accuracy_on_B": {}}
    ref_a, ref_b = next_token(model, exact, q_a), next_token(model, exact, q_b)
    for cname, cache in combined.items():
        out["layer_rel_error"][cname] = states.layer_errors(cache, exact)
        la, lb = next_token(model, cache, q_a), next_token(model, cache, q_b)
        out["next_token_kl"][cname] = 0.5 * (kl(ref_a, la) + kl(ref_b, lb))
        out["accuracy_on_A"][cname] = float((np.asarray(la.argmax(-1)) == ans_a).mean())
        out["accuracy_on_B"][cname] = float((np.asarray(lb.argmax(-1)) == ans_b).mean())
    for cname, cache in {"sequential_A_then_B": exact, "a_alone": after_a}.items():
        out["accuracy_on_A"][cname] = float((np.asarray(next_token(model, cache, q_a).argmax(-1)) == ans_a).mean())
        out["accuracy_on_B"][cname] = float((np.asarray(next_token(model, cache, q_b).argmax(-1)) == ans_b).mean())
    results[name] = out
    print(name, {k: [f"{e:.1e}" for e in v] for k, v in out["layer_rel_error"].items()}, flush=True)
    print("   KL", {k: f"{v:.2e}" for k, v in out["next_token_kl"].items()})
    if name == "mamba1_trained":
        print("   acc A", out["accuracy_on_A"], "\n   acc B", out["accuracy_on_B"], flush=True)

# %% Results
write_results(args, NAME, {
    "model_trained_steps": model_step,
    "hyperparameters": {"pairs": PAIRS, "doc_len": TASK.doc_len, "seed": SEED,
                        "models": {k: mj.states.io.config_dict(m.config) for k, m in models.items()}},
    "chance": 1.0 / vocab.n_values,
    "results": results,
})
fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), sharey=True)
for ax, (name, out) in zip(np.atleast_1d(axes), results.items()):
    for cname, errs in out["layer_rel_error"].items():
        ax.plot(range(len(errs)), np.maximum(errs, 1e-9), "o-", label=cname)
    ax.set_yscale("log")
    ax.set_title(name)
    ax.set_xlabel("layer")
np.atleast_1d(axes)[0].set_ylabel("relative state error vs running A+B")
np.atleast_1d(axes)[0].legend(fontsize=7)
save_figure(args, NAME, fig)  # --quick: into its temporary --out
