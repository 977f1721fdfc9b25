# %% [markdown]
# # Where a training step's time goes on CPU, op by op
#
# The byte-LM models of `bench_train_step.py` (Mamba: 5 layers, d_model 128;
# Transformer++: 3 blocks; ~0.62M parameters each), one AdamW step at batch
# 16 x 256, compiled as the `Trainer` compiles it. For each model and each set
# of XLA flags, a fresh process (XLA reads its flags once):
#
# 1. times the step and the forward (interleaved rounds, medians);
# 2. traces a few steps with `jax.profiler` and sums the time of every XLA
#    thunk (one fusion, dot, custom call, ... of the compiled program) over
#    them, per step;
# 3. classifies each thunk from the compiled HLO: the native scan kernel (an
#    FFI custom call), a matrix product (a dot, alone or inside a fusion),
#    a reduction, or other elementwise / copy work.
#
# The flag sets: XLA's defaults, and the defaults with the YNNPACK fusions off
# (`--xla_cpu_experimental_ynn_fusion_type=`), which on jax 0.10 turn most of
# the model's matrix products into library calls. Writes
# `experiments/results/profile_train_step_cpu.json` (no figure: a table).

# %%
import collections
import functools
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model, parse_args, write_results

NAME = "profile_train_step_cpu"
D_MODEL, MAMBA_LAYERS, TPP_LAYERS, ATTN_HEADS, D_STATE = 128, 5, 3, 4, 16
BATCH, SEQ_LEN, VOCAB = 16, 256, 256
ROUNDS, TRACED_STEPS, TOP = 7, 5, 15
FLAG_SETS = {"xla defaults": "", "ynnpack fusions off": "--xla_cpu_experimental_ynn_fusion_type="}
MODELS = ("mamba", "transformer_pp")


def worker(model_name, quick):
    """In a fresh process: times, traces and classifies one model's step; prints one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import mamba_jax as mj
    from mamba_jax import train as mj_train

    d, layers, tpp_layers, heads, b, l, rounds, traced = (
        (32, 2, 1, 2, 2, 32, 2, 2) if quick else (D_MODEL, MAMBA_LAYERS, TPP_LAYERS, ATTN_HEADS, BATCH, SEQ_LEN, ROUNDS, TRACED_STEPS)
    )
    config = (mj.MambaConfig(d_model=d, n_layer=layers, vocab_size=VOCAB, d_state=D_STATE) if model_name == "mamba"
              else mj.MambaConfig.transformer_pp(d_model=d, n_layer=tpp_layers, vocab_size=VOCAB, attn_num_heads=heads))
    model = mj.MambaLM(config, rngs=nnx.Rngs(0))
    optimizer = mj_train.make_optimizer(model, total_steps=1000, warmup_steps=10)
    graphdef, state = nnx.split((model, optimizer))
    fwd_graphdef, fwd_state = nnx.split(mj.MambaLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, VOCAB, (b, l)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, VOCAB, (b, l)), jnp.int32), "weights": jnp.ones((b, l), jnp.float32)}
    step = jax.jit(functools.partial(mj_train._pure_train_step, graphdef, 1), donate_argnums=0).lower(state, batch).compile()
    forward = jax.jit(lambda s, ids: nnx.merge(fwd_graphdef, s)(ids)).lower(fwd_state, batch["inputs"]).compile()
    hlo = step.as_text()

    def timed(fn):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t

    box = [state]

    def one_step():
        box[0], metrics = step(box[0], batch)
        return box[0], metrics

    one_step(), jax.block_until_ready(forward(fwd_state, batch["inputs"]))  # warm-up
    step_s, fwd_s = [], []
    for _ in range(rounds):
        step_s.append(timed(one_step))
        fwd_s.append(timed(lambda: forward(fwd_state, batch["inputs"])))

    trace_dir = tempfile.mkdtemp(prefix="profile_train_step_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(traced):
            jax.block_until_ready(one_step())
    events = json.load(gzip.open(next(Path(trace_dir).rglob("*.trace.json.gz"))))
    events = events["traceEvents"] if isinstance(events, dict) else events
    thunk_us = collections.Counter()
    for e in events:  # thunks carry their HLO instruction's name; skip the runtime's and Python's own events
        if e.get("ph") == "X" and re.fullmatch(r"[\w.-]+", e["name"]) and not e["name"].startswith(("ThunkExecutor", "Slinky")):
            thunk_us[e["name"]] += e.get("dur", 0)

    def describe(name):
        """(kind, shape, op_name) of an instruction of the compiled program."""
        m = re.search(r"\n\s*%?" + re.escape(name) + r" = (\S+) ([^\n]*)", hlo)
        if m is None:
            return None
        shape, rest = m.group(1), m.group(2)
        body = ""
        called = re.search(r"calls=%?([\w.-]+)", rest)
        if called:
            found = re.search(r"\n%?" + re.escape(called.group(1)) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.S)
            body = found.group(1) if found else ""
        op = re.search(r'op_name="([^"]*)"', rest)
        if "custom_call_target" in rest or name.startswith("ffi_call"):
            kind = "scan kernel (FFI)" if "selective_scan" in (op.group(1) if op else "") else "custom call"
        elif rest.startswith("dot(") or " dot(" in body:
            kind = "matrix product"
        elif rest.startswith(("reduce(", "reduce-window(")) or " reduce(" in body or " reduce-window(" in body:
            kind = "reduction"
        else:
            kind = "elementwise / copy / other"
        return kind, shape, op.group(1) if op else ""

    def phase(op_name):
        """Which part of the step an instruction belongs to, from its op_name: the
        forward pass (under jvp), its transpose (the backward), or the rest (AdamW)."""
        return "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "optimizer / other"

    by_kind, by_phase, ops, unmatched = collections.Counter(), collections.Counter(), [], 0.0
    for name, us in thunk_us.items():
        ms = us / traced / 1e3
        info = describe(name)
        if info is None:
            unmatched += ms
            continue
        by_kind[info[0]] += ms
        by_phase[f"{phase(info[2])}: {info[0]}"] += ms
        ops.append({"thunk": name, "ms_per_step": ms, "kind": info[0], "shape": info[1], "op_name": info[2][-120:]})
    ops.sort(key=lambda o: -o["ms_per_step"])
    print(json.dumps({
        "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "step_s_median": statistics.median(step_s), "forward_s_median": statistics.median(fwd_s),
        "step_over_forward": statistics.median(step_s) / statistics.median(fwd_s),
        "thunk_ms_per_step": sum(by_kind.values()), "unmatched_thunk_ms_per_step": unmatched,
        "ms_per_step_by_kind": dict(by_kind.most_common()), "ms_per_step_by_phase_and_kind": dict(sorted(by_phase.items())),
        "top_ops": ops[:TOP],
        "matrix_product_ops": [o for o in ops if o["kind"] == "matrix product"][:TOP],
        "elementwise_ops": [o for o in ops if o["kind"] == "elementwise / copy / other"][:TOP],
    }))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    worker(sys.argv[2], "--quick" in sys.argv)
    sys.exit(0)

# %%
args = parse_args(NAME, __doc__)
results = {}
for label, flags in FLAG_SETS.items():
    for model_name in MODELS:
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(), "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, __file__, "--worker", model_name] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"worker {model_name} [{label}] failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.setdefault(label, {})[model_name] = r
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in r["ms_per_step_by_kind"].items())
        print(f"[{label}] {model_name}: step {r['step_s_median'] * 1e3:.0f} ms, forward {r['forward_s_median'] * 1e3:.0f} ms "
              f"(step/fwd {r['step_over_forward']:.2f}); thunks per step: {kinds} ms", flush=True)
        print("    by phase: " + ", ".join(f"{k} {v:.0f}" for k, v in r["ms_per_step_by_phase_and_kind"].items()), flush=True)

default, off = results["xla defaults"], results["ynnpack fusions off"]
ratios = {
    f"{m}_step_speedup_ynnpack_off": default[m]["step_s_median"] / off[m]["step_s_median"] for m in MODELS
} | {
    f"{m}_forward_speedup_ynnpack_off": default[m]["forward_s_median"] / off[m]["forward_s_median"] for m in MODELS
} | {
    f"mamba_train_tokens_per_s_over_transformer_pp [{label}]":
        results[label]["transformer_pp"]["step_s_median"] / results[label]["mamba"]["step_s_median"] for label in FLAG_SETS
} | {
    f"mamba_matrix_product_ms_ynnpack_off_over_default":
        off["mamba"]["ms_per_step_by_kind"].get("matrix product", 0.0)
        / default["mamba"]["ms_per_step_by_kind"].get("matrix product", float("nan")),
}
for k, v in ratios.items():
    print(f"{k}: {v:.2f}")
write_results(args, NAME, {
    "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(),
    "setup": {"d_model": D_MODEL, "mamba_layers": MAMBA_LAYERS, "transformer_pp_blocks": TPP_LAYERS, "batch": BATCH,
              "seq_len": SEQ_LEN, "rounds": ROUNDS, "traced_steps": TRACED_STEPS, "flag_sets": FLAG_SETS,
              "note": "thunk times are summed from a jax.profiler trace (inflated a little by tracing); step and "
                      "forward are timed without the profiler; only ratios within this run mean something"},
    "results": results, "ratios": ratios,
})
