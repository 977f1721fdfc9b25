# %% [markdown]
# # SSD (Mamba-2) vs the selective scan (Mamba-1) at equal state size, on CPU
#
# `mj.ops.ssd(impl="chunked")` against `mj.ops.selective_scan` (impl
# "sequential", the CPU default, and "chunked"), forward and forward+backward,
# at the same recurrent state size per token: `h * p * n == d * n_mamba1`.
# Two SSD shapes: the same channels and state as Mamba-1 (`h * p = d`, same n),
# and a Mamba-2-like shape with a larger state per channel and fewer channels
# (`n = 64`, `h * p = d / 4`). Float32 inputs, b = 1, l = 512 ... 16k; time is
# the median over repeated calls of the compiled function (after a warm-up),
# and "x seq" is the ratio to Mamba-1 "sequential" at the same length, measured
# in the same run. Peak memory is XLA's compiled memory analysis (arguments +
# outputs + temporaries) of forward+backward.
#
# Writes experiments/results/bench_ssd_cpu.{json,png} with the CPU model.
# `--quick` runs tiny shapes in seconds and writes nothing (unless `--out`).

# %%
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mamba_jax as mj  # noqa: E402

# Hyperparameters --------------------------------------------------------------
D_MAMBA1, N_MAMBA1 = 256, 16  # Mamba-1: d channels, state n per channel -> state d * n per token
# name -> (impl, kwargs): every entry has state size D_MAMBA1 * N_MAMBA1 per token
CONFIGS = {
    "scan sequential (d256 n16)": ("scan", dict(impl="sequential")),
    "scan chunked (d256 n16)": ("scan", dict(impl="chunked")),
    "ssd chunked T256 (h4 p64 n16)": ("ssd", dict(h=4, p=64, n=16, chunk_size=256)),
    "ssd chunked T64 (h4 p64 n16)": ("ssd", dict(h=4, p=64, n=16, chunk_size=64)),
    "ssd chunked T256 (h1 p64 n64)": ("ssd", dict(h=1, p=64, n=64, chunk_size=256)),
}
BASELINE = "scan sequential (d256 n16)"
LENGTHS = [512, 2048, 8192, 16384]
QUICK_LENGTHS = [128]
TIME_BUDGET_S = 0.5  # per measurement, after warm-up
MAX_REPEATS = 30
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# %%
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def make_inputs(kind, l, cfg, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
    if kind == "scan":
        d, n = D_MAMBA1, N_MAMBA1
        return dict(
            u=normal(ks[0], (1, l, d)), delta=-2.0 + 0.5 * normal(ks[1], (1, l, d)),
            A=-jnp.exp(0.5 * normal(ks[2], (d, n))), B=normal(ks[3], (1, l, n)), C=normal(ks[4], (1, l, n)),
            D=normal(ks[5], (d,)), z=normal(ks[6], (1, l, d)), delta_bias=0.5 * normal(ks[7], (d,)),
        )
    h, p, n = cfg["h"], cfg["p"], cfg["n"]
    return dict(
        x=normal(ks[0], (1, l, h, p)), dt=-2.0 + 0.5 * normal(ks[1], (1, l, h)),
        A=-jnp.exp(0.5 * normal(ks[2], (h,))), B=normal(ks[3], (1, l, 1, n)), C=normal(ks[4], (1, l, 1, n)),
        D=normal(ks[5], (h,)), z=normal(ks[6], (1, l, h, p)), dt_bias=0.5 * normal(ks[7], (h,)),
    )


def forward_fn(kind, cfg):
    if kind == "scan":
        return lambda a: mj.ops.selective_scan(**a, delta_softplus=True, return_final_state=True, impl=cfg["impl"])
    return lambda a: mj.ops.ssd(**a, chunk_size=cfg["chunk_size"], dt_softplus=True, return_final_state=True,
                                impl="chunked")


def fwd_bwd_fn(f):
    def loss(a):
        y, h = f(a)
        return jnp.sum(y * jnp.sin(y)) + jnp.sum(h)  # a cotangent that is not constant

    return jax.grad(loss)


def compile_with_peak(f, args):
    c = jax.jit(f).lower(args).compile()
    m = c.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return c, peak


def median_time(c, args):
    jax.block_until_ready(c(args))  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < MAX_REPEATS and (not times or time.perf_counter() - start < TIME_BUDGET_S):
        t = time.perf_counter()
        jax.block_until_ready(c(args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# %%
def bench_one(name, l):
    kind, cfg = CONFIGS[name]
    args = make_inputs(kind, l, cfg)
    f = forward_fn(kind, cfg)
    cf, peak_f = compile_with_peak(f, args)
    cb, peak_b = compile_with_peak(fwd_bwd_fn(f), args)
    row = dict(config=name, kind=kind, l=l, **cfg, peak_fwd_bytes=peak_f, peak_fwd_bwd_bytes=peak_b)
    row["state_per_token"] = D_MAMBA1 * N_MAMBA1 if kind == "scan" else cfg["h"] * cfg["p"] * cfg["n"]
    y, _ = cf(args)
    row["finite"] = bool(jnp.all(jnp.isfinite(y)))
    row["fwd_s"] = median_time(cf, args)
    row["fwd_bwd_s"] = median_time(cb, args)
    return row


def table(rows):
    base = {(r["l"]): r for r in rows if r["config"] == BASELINE}
    lines = [
        "| config | l | fwd ms | x seq | fwd+bwd ms | x seq | peak fwd+bwd MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["l"])
        rf = f"{r['fwd_s'] / b['fwd_s']:.2f}" if b else ""
        rb = f"{r['fwd_bwd_s'] / b['fwd_bwd_s']:.2f}" if b else ""
        lines.append(
            f"| {r['config']} | {r['l']} | {r['fwd_s'] * 1e3:.2f} | {rf} | {r['fwd_bwd_s'] * 1e3:.2f} | {rb} | "
            f"{r['peak_fwd_bwd_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "fwd_s", "forward ms"), (axes[1], "fwd_bwd_s", "forward+backward ms")):
        for name in CONFIGS:
            pts = sorted((r["l"], r[key]) for r in rows if r["config"] == name)
            if pts:
                ls, ts = zip(*pts)
                ax.loglog(ls, [t * 1e3 for t in ts], "o-", label=name)
        ax.set_xlabel("sequence length l")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny lengths, seconds; writes nothing unless --out")
    ap.add_argument("--out", default=None, help=f"directory for the JSON and PNG (default {RESULTS})")
    a, _ = ap.parse_known_args()
    lengths = QUICK_LENGTHS if a.quick else LENGTHS
    if a.quick:
        global TIME_BUDGET_S, MAX_REPEATS
        TIME_BUDGET_S, MAX_REPEATS = 0.05, 3
    cpu = cpu_model()
    print(f"device {jax.devices()[0].device_kind}; CPU {cpu}; {os.cpu_count()} cores; jax {jax.__version__}", flush=True)
    rows = []
    for l in lengths:
        for name in CONFIGS:
            r = bench_one(name, l)
            rows.append(r)
            print(f"{name:32s} l={l:6d} fwd {r['fwd_s'] * 1e3:9.2f} ms  fwd+bwd {r['fwd_bwd_s'] * 1e3:9.2f} ms  "
                  f"peak {r['peak_fwd_bwd_bytes'] / 2**20:8.1f} MiB", flush=True)
    tab = table(rows)
    print("\n" + tab)
    out = a.out if a.out is not None else (None if a.quick else RESULTS)
    if out is None:
        return
    os.makedirs(out, exist_ok=True)
    payload = dict(
        benchmark="bench_ssd", quick=a.quick, cpu_model=cpu, cpu_count=os.cpu_count(),
        device=jax.devices()[0].device_kind, jax=jax.__version__, dtype="float32", b=1,
        state_per_token=D_MAMBA1 * N_MAMBA1, baseline=BASELINE, date=time.strftime("%Y-%m-%d"),
        load_average_at_end=os.getloadavg(), rows=rows, table=tab,
    )
    stem = "bench_ssd_cpu" + ("_quick" if a.quick else "")
    with open(os.path.join(out, stem + ".json"), "w") as fh:
        json.dump(payload, fh, indent=1)
    plot(rows, os.path.join(out, stem + ".png"),
         f"SSD vs selective scan at state {D_MAMBA1 * N_MAMBA1}/token, float32, b=1 ({cpu})")
    print("wrote", os.path.join(out, stem + ".json"))


if __name__ == "__main__":
    main()
