# %% [markdown]
# # 05 · States: what snapshots every K tokens cost
#
# **The question** (STATES-IDEAS 2.1): a recurrent model's state lives only in fast memory
# and is lost by default; exporting one state is cheap, but "every 10 states or every
# hundred States or every thousand that's going to be a lot more". How much does it cost to
# keep the state every K tokens of a long prefill, in time and in bytes?
#
# **What we do.** A prefill of LENGTH tokens through a random-init Mamba-1 and Mamba-2 model,
# chunk by chunk with the cache inside one `lax.scan`
# (`mamba_jax.states.prefill_snapshots`): the state after every chunk of K tokens is an
# output of the scan. For each K we time three things side by side, in one run, compile
# excluded, best of REPEATS interleaved rounds:
#
# - **plain**: the prefill in chunks of PLAIN_CHUNK tokens keeping only the final state;
# - **chunked(K)**: the same prefill in chunks of K, keeping only the final state;
# - **snapshots(K)**: chunks of K, keeping every state.
#
# `chunked(K) / plain` is the cost of cutting the scan into short pieces; `snapshots(K) /
# chunked(K)` is the cost of writing the states out. Bytes are the stacked snapshots.
# The snapshots come from chunked prefill, not from inside the scan kernel (that would
# need a hook in `mamba_jax.ops`, not built). The CPU was shared with other jobs:
# only the ratios measured side by side mean anything.

# %%
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args, save_figure, write_results

import mamba_jax as mj
from mamba_jax import states

NAME = "05_states_snapshots"

# %% Hyperparameters
LENGTH = 65536  # tokens in the prefill
EVERY = (16, 64, 256, 1024, 4096)  # K
PLAIN_CHUNK = 4096  # the prefill without snapshots
REPEATS = 3  # interleaved rounds; the best time of each variant is kept
MODELS = {
    "mamba1": dict(d_model=128, n_layer=2, d_state=16, vocab_size=256),
    "mamba2": dict(d_model=128, n_layer=2, vocab_size=256, layer="mamba2", d_state=64, headdim=32, chunk_size=64),
}

# %%
args = parse_args(NAME, __doc__, extra=lambda p: p.add_argument("--length", type=int, default=None))
if args.quick:
    LENGTH, EVERY, PLAIN_CHUNK, REPEATS = 256, (16, 64), 128, 1
if args.length:
    LENGTH = args.length


def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


# %% Measure: every variant compiled first, then REPEATS interleaved rounds (plain, then for each K
# chunked and snapshots), keeping each variant's best time: load from other jobs hits all alike.
rows = []
for name, kw in MODELS.items():
    model = mj.MambaLM(mj.MambaConfig(**kw), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, kw["vocab_size"], (1, LENGTH)), jnp.int32)
    state_bytes = model.init_cache(1).nbytes()
    variants = {"plain": lambda: states.prefill_chunked(model, ids, PLAIN_CHUNK)}
    for k in EVERY:
        variants[("chunked", k)] = lambda k=k: states.prefill_chunked(model, ids, k)
        variants[("snapshots", k)] = lambda k=k: states.prefill_snapshots(model, ids, k).states
    best = {}
    for key, fn in variants.items():  # compile
        jax.block_until_ready(fn())
    for _ in range(REPEATS):
        for key, fn in variants.items():
            best[key] = min(best.get(key, float("inf")), timed(fn))
    plain = best["plain"]
    final = states.prefill_chunked(model, ids, PLAIN_CHUNK)
    print(f"{name}: plain prefill of {LENGTH} tokens {plain:.2f} s; one state {state_bytes} bytes", flush=True)
    for k in EVERY:
        snaps = states.prefill_snapshots(model, ids, k)
        chunked, snap_t = best[("chunked", k)], best[("snapshots", k)]
        row = {
            "model": name,
            "every": k,
            "snapshots": len(snaps),
            "bytes": snaps.nbytes(),
            "bytes_per_token": snaps.nbytes() / LENGTH,
            "plain_s": plain,
            "chunked_s": chunked,
            "snapshots_s": snap_t,
            "chunking_overhead": chunked / plain,
            "export_overhead": snap_t / chunked,
            "total_overhead": snap_t / plain,
        }
        rows.append(row)
        print(f"  K={k:5d}: {len(snaps):5d} states, {snaps.nbytes() / 2**20:8.2f} MiB, chunked/plain "
              f"{row['chunking_overhead']:.2f}x, snapshots/chunked {row['export_overhead']:.2f}x, "
              f"snapshots/plain {row['total_overhead']:.2f}x", flush=True)
        if LENGTH % k == 0:  # the last snapshot is the plain prefill's final state
            for a, b in zip(snaps.at(-1).layers, final.layers):
                err = float(jnp.linalg.norm(a.ssm_state - b.ssm_state) / jnp.linalg.norm(b.ssm_state))
                assert err < 1e-4, err

# %% Results
write_results(args, NAME, {
    "hyperparameters": {"length": LENGTH, "every": list(EVERY), "plain_chunk": PLAIN_CHUNK, "repeats": REPEATS,
                        "models": MODELS, "batch": 1},
    "rows": rows,
    "note": "CPU (2 cores) shared with other jobs (load average 10-18 during the run): ratios within one run only; "
            "K = PLAIN_CHUNK repeats the plain prefill, so its ratio shows the noise floor.",
})
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for name in MODELS:
    r = [x for x in rows if x["model"] == name]
    ks = [x["every"] for x in r]
    axes[0].plot(ks, [x["total_overhead"] for x in r], "o-", label=f"{name}: snapshots / plain")
    axes[0].plot(ks, [x["chunking_overhead"] for x in r], "x--", label=f"{name}: chunked(K) / plain")
    axes[1].plot(ks, [x["bytes"] / 2**20 for x in r], "o-", label=name)
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (tokens between snapshots)")
    ax.legend()
axes[0].set_ylabel("time relative to a plain prefill")
axes[1].set_yscale("log")
axes[1].set_ylabel("MiB of snapshots")
fig.suptitle(f"Snapshots every K tokens of a {LENGTH}-token prefill (CPU, under load)")
save_figure(args, NAME, fig)  # --quick: into its temporary --out
