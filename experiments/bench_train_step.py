# %% [markdown]
# # Training speed on CPU: Mamba against Transformer++ at equal parameters
#
# The byte-LM models of `04_byte_lm.py` (Mamba: 5 layers, d_model 128, d_state
# 16; Transformer++: 3 blocks of attention + SwiGLU MLP; ~0.62M parameters
# each), one AdamW step at batch 16 x 256 bytes, the step function the
# `Trainer` runs (jitted, state donated). Timed side by side in one process,
# interleaved round by round, median of the rounds:
#
# 1. tokens/s of one training step and of the forward pass, per model;
# 2. the same Mamba with the scan `impl="auto"` picked before the native CPU
#    kernel (`"sequential"`, XLA), and with the previous backward of that scan
#    (`sequential_v0`, kept in `mamba_jax.ops.selective_scan` for this), so the
#    speed-ups are ratios measured in the same run;
# 3. the selective scan alone at the training shape (b 16, l 256, d_inner 256,
#    n 16, with D, z and softplus): forward and forward+backward per
#    implementation;
# 4. where Mamba's step goes: the same model with the scan replaced by an
#    elementwise stand-in that reads every input of the scan (so nothing around
#    it is dead code), compiled and timed in the same rounds: the difference is
#    the scan's share, the rest is everything else (projections, conv, norms,
#    gates, embedding, loss, AdamW), with its own step/forward ratio.
#
# The CPU may be shared with other jobs: only the ratios mean something, and
# the load average before and after is recorded. Each call is timed in wall
# seconds (medians and minima) and in process CPU seconds (all threads; less
# sensitive to time lost to other jobs, more to the threads' spinning). Writes
# `experiments/results/bench_train_step_cpu.json` and `.png`.

# %%
import contextlib
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mamba_jax as mj
from _common import cpu_model, parse_args, save_figure, write_results
from mamba_jax import train as mj_train
from pallas_kernels.selective_scan.reference import finish, prepare

NAME = "bench_train_step_cpu"

# %% Hyperparameters (the byte-LM experiment's)
D_MODEL, MAMBA_LAYERS, TPP_LAYERS, ATTN_HEADS, D_STATE = 128, 5, 3, 4, 16
BATCH, SEQ_LEN, VOCAB = 16, 256, 256
ROUNDS = 9  # interleaved timing rounds; medians reported (and minima: the least disturbed by other jobs)
SCAN_SHAPE = (16, 256, 256, 16)  # (b, l, d_inner, n) of one layer of the Mamba above
SCAN_IMPLS = ["cpu", "sequential", "sequential_v0", "chunked"]

args = parse_args(NAME, __doc__)
if args.quick:
    D_MODEL, MAMBA_LAYERS, TPP_LAYERS, ATTN_HEADS, BATCH, SEQ_LEN, ROUNDS = 32, 2, 1, 2, 2, 32, 2
    SCAN_SHAPE = (2, 32, 64, 16)

_scan_module = sys.modules["mamba_jax.ops.selective_scan"]  # the module (the package re-exports the function)


@contextlib.contextmanager
def swapped_scan_impls(swap):
    """While open, each implementation ``impl`` in ``swap`` (the one ``"auto"``
    picks included) traces to ``swap[impl]`` (another implementation's name, or a
    function with the signature of ``_impl_fn``'s); compile inside it.

    The swap is made where the implementation is chosen (``_impl_fn``), so the
    jitted implementation gets another static argument: jax's trace cache
    cannot hand back the current implementation's trace."""
    current = _scan_module._impl_fn

    def previous(impl, chunk_size, platform):
        target = swap.get(impl, impl)
        return target if callable(target) else current(target, chunk_size, platform)

    _scan_module._impl_fn = previous
    try:
        yield
    finally:
        _scan_module._impl_fn = current


def scan_stand_in(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, keep):
    """Not a scan: O(b l d) elementwise work that uses every input the scan uses
    (so their producers and gradients stay in the program), for the ablation."""
    u_, dt, A_, B_, C_, h0 = prepare(u, delta, A, B, C, delta_bias, delta_softplus, initial_state)
    y = u_ * dt + jnp.sum(B_ * C_, axis=-1, keepdims=True)
    return finish(y, h0 + jnp.sum(dt, axis=1)[..., None] * A_, u, D, z)


STAND_IN = "mamba (scan replaced by a stand-in)"
CONFIGS = {
    "mamba": mj.MambaConfig(d_model=D_MODEL, n_layer=MAMBA_LAYERS, vocab_size=VOCAB, d_state=D_STATE),
    "mamba (XLA sequential scan)": mj.MambaConfig(
        d_model=D_MODEL, n_layer=MAMBA_LAYERS, vocab_size=VOCAB, d_state=D_STATE
    ),
    "mamba (previous scan backward)": mj.MambaConfig(
        d_model=D_MODEL, n_layer=MAMBA_LAYERS, vocab_size=VOCAB, d_state=D_STATE
    ),
    STAND_IN: mj.MambaConfig(d_model=D_MODEL, n_layer=MAMBA_LAYERS, vocab_size=VOCAB, d_state=D_STATE),
    "transformer_pp": mj.MambaConfig.transformer_pp(
        d_model=D_MODEL, n_layer=TPP_LAYERS, vocab_size=VOCAB, attn_num_heads=ATTN_HEADS
    ),
}
# "mamba" runs what impl="auto" picks (on CPU the native kernel, impl="cpu");
# the others swap it for the XLA implementations auto picked before.
SWAPS = {
    "mamba (XLA sequential scan)": {"cpu": "sequential"},
    "mamba (previous scan backward)": {"cpu": "sequential_v0", "sequential": "sequential_v0"},
    STAND_IN: {"cpu": scan_stand_in, "sequential": scan_stand_in},
}

rng = np.random.default_rng(0)
batch = {
    "inputs": jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ_LEN)), jnp.int32),
    "targets": jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ_LEN)), jnp.int32),
    "weights": jnp.ones((BATCH, SEQ_LEN), jnp.float32),
}
load_before = os.getloadavg()


# %% Compile every model's training step and forward ahead of time
def build(name, config):
    model = mj.MambaLM(config, rngs=nnx.Rngs(0))
    n_params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    optimizer = mj_train.make_optimizer(model, total_steps=1000, warmup_steps=10)
    graphdef, state = nnx.split((model, optimizer))
    fwd_graphdef, fwd_state = nnx.split(mj.MambaLM(config, rngs=nnx.Rngs(0)))  # its own buffers (the step donates)
    ctx = swapped_scan_impls(SWAPS[name]) if name in SWAPS else contextlib.nullcontext()
    with ctx:
        step = jax.jit(functools.partial(mj_train._pure_train_step, graphdef, 1), donate_argnums=0)
        step = step.lower(state, batch).compile()
        forward = jax.jit(lambda s, ids: nnx.merge(fwd_graphdef, s)(ids)).lower(fwd_state, batch["inputs"]).compile()
    return {"params": n_params, "step": step, "state": state, "forward": forward, "fwd_state": fwd_state}


models = {}
for name, config in CONFIGS.items():
    models[name] = build(name, config)
    print(f"{name}: {models[name]['params']:,} parameters, compiled", flush=True)
hlo = {name: models[name]["step"].as_text() for name in ("mamba", *SWAPS)}
for name in SWAPS:
    if hlo["mamba"] == hlo[name]:
        raise RuntimeError(f"{name!r} compiled to the same program as 'mamba'")


# %% The selective scan alone, at the training shape
def scan_inputs(b, l, d, n):
    ks = jax.random.split(jax.random.key(1), 8)
    return dict(
        u=jax.random.normal(ks[0], (b, l, d)), delta=0.5 * jax.random.normal(ks[1], (b, l, d)),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d, n))), B=jax.random.normal(ks[3], (b, l, n)),
        C=jax.random.normal(ks[4], (b, l, n)), D=jax.random.normal(ks[5], (d,)),
        z=jax.random.normal(ks[6], (b, l, d)), delta_bias=0.5 * jax.random.normal(ks[7], (d,)),
    )


sargs = scan_inputs(*SCAN_SHAPE)
scans = {}
for impl in SCAN_IMPLS:
    public = "sequential" if impl == "sequential_v0" else impl
    f = lambda a, public=public: mj.ops.selective_scan(**a, delta_softplus=True, impl=public)
    cot = jax.random.normal(jax.random.key(2), SCAN_SHAPE[:3])
    ctx = swapped_scan_impls({"sequential": "sequential_v0"}) if impl == "sequential_v0" else contextlib.nullcontext()
    with ctx:
        fwd = jax.jit(f).lower(sargs).compile()
        grad = jax.jit(jax.grad(lambda a, f=f: jnp.sum(f(a) * cot))).lower(sargs).compile()
    scans[impl] = (fwd, grad)
if scans["sequential"][1].as_text() == scans["sequential_v0"][1].as_text():
    raise RuntimeError("sequential_v0 compiled to the same program as sequential")


# %% Interleaved timing rounds
cpu_times = {}  # process CPU seconds (all threads) of the same calls: less sensitive to other jobs than wall time


def timed(fn, key):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    cpu_times.setdefault(key, []).append(time.process_time() - c)
    return time.perf_counter() - t


times = {name: {"step": [], "forward": []} for name in models}
scan_times = {impl: {"forward": [], "forward_backward": []} for impl in scans}
for name, m in models.items():  # warm-up: one step and one forward each
    m["state"], _ = m["step"](m["state"], batch)
    jax.block_until_ready(m["forward"](m["fwd_state"], batch["inputs"]))
for r in range(ROUNDS):
    for name, m in models.items():
        def one_step(m=m):
            m["state"], metrics = m["step"](m["state"], batch)
            return m["state"], metrics

        times[name]["step"].append(timed(one_step, (name, "step")))
        times[name]["forward"].append(timed(lambda m=m: m["forward"](m["fwd_state"], batch["inputs"]), (name, "forward")))
    for impl, (fwd, grad) in scans.items():
        scan_times[impl]["forward"].append(timed(lambda: fwd(sargs), ("scan " + impl, "forward")))
        scan_times[impl]["forward_backward"].append(timed(lambda: grad(sargs), ("scan " + impl, "forward_backward")))
    print(f"round {r + 1}/{ROUNDS}: " + ", ".join(f"{k} {v['step'][-1] * 1e3:.0f} ms" for k, v in times.items()),
          flush=True)

# %% Ratios
tokens = BATCH * SEQ_LEN
med = lambda xs: float(statistics.median(xs))
rows = {}
for name, m in models.items():
    step_s, fwd_s = med(times[name]["step"]), med(times[name]["forward"])
    rows[name] = {
        "params": m["params"], "step_s_median": step_s, "forward_s_median": fwd_s,
        "train_tokens_per_s": tokens / step_s, "forward_tokens_per_s": tokens / fwd_s,
        "step_over_forward": step_s / fwd_s, "step_s_min": min(times[name]["step"]),
        "forward_s_min": min(times[name]["forward"]), "step_s_all": times[name]["step"], "forward_s_all": times[name]["forward"],
    }
tpp = rows["transformer_pp"]
for r in rows.values():
    r["train_tokens_per_s_over_transformer_pp"] = r["train_tokens_per_s"] / tpp["train_tokens_per_s"]
    r["of_minima_train_tokens_per_s_over_transformer_pp"] = tpp["step_s_min"] / r["step_s_min"]
    r["of_minima_step_over_forward"] = r["step_s_min"] / r["forward_s_min"]
for name, r in rows.items():
    r["cpu_s_median"] = {"step": med(cpu_times[(name, "step")]), "forward": med(cpu_times[(name, "forward")])}
    r["cpu_step_over_forward"] = r["cpu_s_median"]["step"] / r["cpu_s_median"]["forward"]
    r["cpu_train_tokens_per_s_over_transformer_pp"] = (
        med(cpu_times[("transformer_pp", "step")]) / r["cpu_s_median"]["step"]
    )
scan_rows = {}
for impl, t in scan_times.items():
    f, fb = med(t["forward"]), med(t["forward_backward"])
    scan_rows[impl] = {"forward_s_median": f, "forward_backward_s_median": fb, "forward_backward_over_forward": fb / f,
                       "forward_s_min": min(t["forward"]), "forward_backward_s_min": min(t["forward_backward"]),
                       "forward_s_all": t["forward"], "forward_backward_s_all": t["forward_backward"]}
for impl, r in scan_rows.items():
    r["forward_backward_over_previous_sequential"] = (
        r["forward_backward_s_median"] / scan_rows["sequential_v0"]["forward_backward_s_median"]
    )
    r["cpu_s_median"] = {k: med(cpu_times[("scan " + impl, k)]) for k in ("forward", "forward_backward")}
    r["of_minima_forward_backward_over_previous_sequential"] = (
        r["forward_backward_s_min"] / scan_rows["sequential_v0"]["forward_backward_s_min"]
    )

print(f"\n{'model':<32}{'params':>10}{'step ms':>10}{'fwd ms':>9}{'step/fwd':>10}{'train tok/s':>13}{'vs T++':>8}")
for name, r in rows.items():
    print(f"{name:<32}{r['params']:>10,}{r['step_s_median'] * 1e3:>10.0f}{r['forward_s_median'] * 1e3:>9.0f}"
          f"{r['step_over_forward']:>10.2f}{r['train_tokens_per_s']:>13,.0f}"
          f"{r['train_tokens_per_s_over_transformer_pp']:>8.2f}  (of minima: step/fwd "
          f"{r['of_minima_step_over_forward']:.2f}, vs T++ {r['of_minima_train_tokens_per_s_over_transformer_pp']:.2f})")
for name, r in rows.items():
    print(f"  CPU time (process, all threads), {name}: step/fwd {r['cpu_step_over_forward']:.2f}, "
          f"train speed vs T++ {r['cpu_train_tokens_per_s_over_transformer_pp']:.2f}")
print(f"\nselective_scan {SCAN_SHAPE} (b, l, d, n), with D, z, softplus:")
for impl, r in scan_rows.items():
    print(f"  {impl:<16} fwd {r['forward_s_median'] * 1e3:7.1f} ms  fwd+bwd {r['forward_backward_s_median'] * 1e3:7.1f} ms"
          f"  ({r['forward_backward_over_forward']:.1f}x fwd; {r['forward_backward_over_previous_sequential']:.2f}x of "
          f"sequential_v0; of minima {r['of_minima_forward_backward_over_previous_sequential']:.2f}x)")

# Where Mamba's step goes: the model against itself with the scan replaced (medians).
m, rest = rows["mamba"], rows[STAND_IN]
scan_step, scan_fwd = m["step_s_median"] - rest["step_s_median"], m["forward_s_median"] - rest["forward_s_median"]
breakdown = {
    "what": f"'mamba' against '{STAND_IN}' (the scan swapped for O(b l d) elementwise work on the same inputs): "
            "the difference is the scan's time in the model, the stand-in's times are everything else",
    "scan_s_in_step": scan_step, "scan_s_in_forward": scan_fwd,
    "scan_share_of_step": scan_step / m["step_s_median"], "scan_share_of_forward": scan_fwd / m["forward_s_median"],
    "scan_step_over_forward": scan_step / scan_fwd,
    "rest_s_in_step": rest["step_s_median"], "rest_s_in_forward": rest["forward_s_median"],
    "rest_step_over_forward": rest["step_over_forward"],
    "scan_alone_times_layers_s": {"forward": MAMBA_LAYERS * scan_rows["cpu"]["forward_s_median"],
                                  "forward_backward": MAMBA_LAYERS * scan_rows["cpu"]["forward_backward_s_median"]},
}
print(f"\nwhere Mamba's step goes: scan {scan_step * 1e3:.0f} ms of {m['step_s_median'] * 1e3:.0f} "
      f"({breakdown['scan_share_of_step']:.0%}; its step/fwd {breakdown['scan_step_over_forward']:.2f}), "
      f"the rest {rest['step_s_median'] * 1e3:.0f} ms (step/fwd {rest['step_over_forward']:.2f})")

results = {
    "cpu_model": cpu_model(),
    "note": "the CPU may be shared with other jobs (load average below): "
    "only the ratios of one run mean something, absolute times do not",
    "load_average": {"before": load_before, "after": os.getloadavg()},
    "setup": {"d_model": D_MODEL, "mamba_layers": MAMBA_LAYERS, "transformer_pp_blocks": TPP_LAYERS,
              "attn_heads": ATTN_HEADS, "d_state": D_STATE, "batch": BATCH, "seq_len": SEQ_LEN, "rounds": ROUNDS,
              "step": "mamba_jax.train._pure_train_step (the Trainer's step: AdamW, clipping), jitted, state donated",
              "previous": "'mamba (previous scan backward)': the same model with selective_scan's sequential "
                          "backward as before (mode sequential_v0), compiled in the same run",
              "xla_sequential": "'mamba (XLA sequential scan)': the same model with the scan auto picked before the "
                                "native CPU kernel (impl='sequential', XLA); 'mamba' runs auto (impl='cpu')"},
    "models": rows,
    "ratios": {
        "mamba_train_tokens_per_s_over_transformer_pp": rows["mamba"]["train_tokens_per_s_over_transformer_pp"],
        "previous_mamba_train_tokens_per_s_over_transformer_pp":
            rows["mamba (previous scan backward)"]["train_tokens_per_s_over_transformer_pp"],
        "mamba_step_over_forward": rows["mamba"]["step_over_forward"],
        "previous_mamba_step_over_forward": rows["mamba (previous scan backward)"]["step_over_forward"],
        "mamba_step_speedup_over_previous":
            rows["mamba (previous scan backward)"]["step_s_median"] / rows["mamba"]["step_s_median"],
        "xla_sequential_mamba_train_tokens_per_s_over_transformer_pp":
            rows["mamba (XLA sequential scan)"]["train_tokens_per_s_over_transformer_pp"],
        "xla_sequential_mamba_step_over_forward": rows["mamba (XLA sequential scan)"]["step_over_forward"],
        "mamba_step_speedup_over_xla_sequential": rows["mamba (XLA sequential scan)"]["step_s_median"] / rows["mamba"]["step_s_median"],
        "of_minima": {
            "mamba_train_tokens_per_s_over_transformer_pp": rows["mamba"]["of_minima_train_tokens_per_s_over_transformer_pp"],
            "previous_mamba_train_tokens_per_s_over_transformer_pp":
                rows["mamba (previous scan backward)"]["of_minima_train_tokens_per_s_over_transformer_pp"],
            "mamba_step_over_forward": rows["mamba"]["of_minima_step_over_forward"],
            "mamba_step_speedup_over_previous":
                rows["mamba (previous scan backward)"]["step_s_min"] / rows["mamba"]["step_s_min"],
            "mamba_step_speedup_over_xla_sequential": rows["mamba (XLA sequential scan)"]["step_s_min"] / rows["mamba"]["step_s_min"],
        },
        "of_process_cpu_time": {
            "mamba_train_tokens_per_s_over_transformer_pp": rows["mamba"]["cpu_train_tokens_per_s_over_transformer_pp"],
            "previous_mamba_train_tokens_per_s_over_transformer_pp":
                rows["mamba (previous scan backward)"]["cpu_train_tokens_per_s_over_transformer_pp"],
            "mamba_step_over_forward": rows["mamba"]["cpu_step_over_forward"],
            "scan_forward_backward_over_previous_sequential":
                scan_rows["sequential"]["cpu_s_median"]["forward_backward"]
                / scan_rows["sequential_v0"]["cpu_s_median"]["forward_backward"],
            "scan_forward_backward_cpu_over_sequential":
                scan_rows["cpu"]["cpu_s_median"]["forward_backward"]
                / scan_rows["sequential"]["cpu_s_median"]["forward_backward"],
        },
        "targets": {"mamba_train_tokens_per_s_over_transformer_pp": 0.8, "mamba_step_over_forward": 3.0},
    },
    "scan": {"shape_b_l_d_n": list(SCAN_SHAPE), "options": "D, z, delta_bias, delta_softplus", "impls": scan_rows},
    "where_the_step_goes": breakdown,
}
write_results(args, NAME, results)

# %% Plot
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
names = list(rows)
x = np.arange(len(names))
ax1.bar(x - 0.2, [rows[n]["train_tokens_per_s"] for n in names], 0.4, label="training step")
ax1.bar(x + 0.2, [rows[n]["forward_tokens_per_s"] for n in names], 0.4, label="forward only")
for i, n in enumerate(names):
    ax1.text(i - 0.2, rows[n]["train_tokens_per_s"], f"{rows[n]['train_tokens_per_s_over_transformer_pp']:.2f}x",
             ha="center", va="bottom", fontsize=8)
ax1.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=8)
ax1.set(ylabel="tokens / s", title=f"batch {BATCH} x {SEQ_LEN}, ~{rows['mamba']['params'] / 1e6:.2f}M params "
        "(labels: train speed / Transformer++)")
ax1.legend(fontsize=8)
impls = list(scan_rows)
x = np.arange(len(impls))
ax2.bar(x - 0.2, [scan_rows[i]["forward_s_median"] * 1e3 for i in impls], 0.4, label="forward")
ax2.bar(x + 0.2, [scan_rows[i]["forward_backward_s_median"] * 1e3 for i in impls], 0.4, label="forward + backward")
ax2.set_xticks(x, impls, fontsize=8)
ax2.set(ylabel="ms (median)", title=f"selective_scan alone, (b, l, d, n) = {SCAN_SHAPE}")
ax2.legend(fontsize=8)
fig.suptitle(f"{cpu_model()}, {os.cpu_count()} cores, float32; "
             f"(load average {load_before[0]:.1f} -> {results['load_average']['after'][0]:.1f}): ratios only", fontsize=8)
save_figure(args, NAME, fig)
