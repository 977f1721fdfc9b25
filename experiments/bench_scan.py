# %% [markdown]
# # Selective-scan benchmark: every implementation, one table
#
# Forward and forward+backward time, compiled peak memory (XLA's memory
# analysis: arguments + outputs + temporaries), and achieved forward bandwidth
# (bytes of u, delta, z, B, C read once and y written once, over time) against
# a measured copy-bandwidth ceiling on the same device (x -> 2x over a large
# buffer, bytes read + written). Writes JSON + PNG to experiments/results/,
# named after the device (bench_scan_cpu.json, bench_scan_h100.json, ...).
#
# CPU (default without a GPU): the XLA impls and the native CPU kernel
# (impl="cpu", C++ through XLA FFI) at d=256, n=16, b=1, float32.
# GPU: every impl incl. the Pallas kernel, bfloat16 inputs, d=1024-2048,
# l=512 ... 256k; an impl whose compiled footprint exceeds the device memory
# is skipped and marked so in the table. `--quick` shrinks everything.

# %%
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mamba_jax as mj  # noqa: E402
from pallas_kernels.selective_scan import SelectiveScanBlockSizes, selective_scan_pallas  # noqa: E402

# Hyperparameters --------------------------------------------------------------
N_STATE = 16
CPU_SHAPES = [(1, l, 256) for l in (256, 1024, 4096, 16384)]  # (b, l, d)
CPU_IMPLS = ["reference", "sequential", "chunked", "cpu"]
GPU_SHAPES = [(1, l, 2048) for l in (512, 2048, 8192, 32768, 131072, 262144)] + [
    (8, l, 1024) for l in (2048, 8192, 32768)
]
GPU_IMPLS = ["reference", "sequential", "chunked", "pallas"]
GPU_TUNE_SHAPE = (1, 32768, 2048)
GPU_TUNE = [(16, 4), (32, 4), (32, 2), (64, 4)]  # (gpu_block_d, num_warps)
TIME_BUDGET_S = 0.3  # per measurement, after warm-up
SLOW_SKIP_S = 0.5  # an impl whose forward took longer at a shorter l (same b, d) is skipped at longer l
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# %%
def device_tag() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    kind = dev.device_kind.lower()
    for tag in ("h200", "h100", "a100", "l4", "v5e", "v5p", "v4", "v6e"):
        if tag in kind.replace(" ", ""):
            return tag
    return kind.replace(" ", "_")


def make_inputs(b, l, d, n, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    return dict(
        u=jax.random.normal(ks[0], (b, l, d), jnp.float32).astype(dtype),
        delta=(0.5 * jax.random.normal(ks[1], (b, l, d), jnp.float32)).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d, n), jnp.float32)),
        B=jax.random.normal(ks[3], (b, l, n), jnp.float32).astype(dtype),
        C=jax.random.normal(ks[4], (b, l, n), jnp.float32).astype(dtype),
        D=jax.random.normal(ks[5], (d,), jnp.float32),
        z=jax.random.normal(ks[6], (b, l, d), jnp.float32).astype(dtype),
        delta_bias=0.5 * jax.random.normal(ks[7], (d,), jnp.float32),
    )


def scan_fn(impl, block_sizes=None):
    if impl == "pallas" and block_sizes is not None:

        def f(a):
            return selective_scan_pallas(
                a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True, None,
                block_sizes=block_sizes, platform="gpu",
            )

        return f
    return lambda a: mj.ops.selective_scan(**a, delta_softplus=True, return_final_state=True, impl=impl)


def fwd_bwd_fn(f):
    def loss(a):
        y, h = f(a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    return jax.grad(loss)


def compiled(f, args):
    c = jax.jit(f).lower(args).compile()
    try:
        m = c.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports it
        peak = None
    return c, peak


def timeit(c, args):
    jax.block_until_ready(c(args))  # warm-up
    times = []
    t_start = time.perf_counter()
    while True:
        t = time.perf_counter()
        jax.block_until_ready(c(args))
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_start > TIME_BUDGET_S or len(times) >= 50:
            break
    return statistics.median(times)


def copy_bandwidth(nbytes) -> float:
    x = jnp.ones((nbytes // 4,), jnp.float32)
    c = jax.jit(lambda x: x * 2.0).lower(x).compile()
    t = timeit(c, x)
    return 2 * x.size * 4 / t


def scan_bytes(b, l, d, n, itemsize):
    """u, delta, z read once, y written once, B and C read once."""
    return (4 * b * l * d + 2 * b * l * n) * itemsize


def rel_err(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# %%
def bench_one(impl, shape, dtype, mem_limit, block_sizes=None, check_against=None):
    b, l, d = shape
    args = make_inputs(b, l, d, N_STATE, dtype)
    row = dict(impl=impl, b=b, l=l, d=d, n=N_STATE, dtype=jnp.dtype(dtype).name)
    f = scan_fn(impl, block_sizes)
    try:
        cf, peak_f = compiled(f, args)
        cb, peak_b = compiled(fwd_bwd_fn(f), args)
    except Exception as e:  # noqa: BLE001
        row["skipped"] = f"compile failed: {type(e).__name__}: {str(e)[:200]}"
        return row, None
    row["peak_fwd_bytes"], row["peak_fwd_bwd_bytes"] = peak_f, peak_b
    if mem_limit and max(peak_f or 0, peak_b or 0) > mem_limit:
        row["skipped"] = f"needs {max(peak_f, peak_b) / 2**30:.1f} GiB > {mem_limit / 2**30:.0f} GiB device memory"
        return row, None
    try:
        y = cf(args)
        row["fwd_s"] = timeit(cf, args)
        row["fwd_bwd_s"] = timeit(cb, args)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at run time
        row["skipped"] = f"run failed: {type(e).__name__}: {str(e)[:200]}"
        return row, None
    row["fwd_GBps"] = scan_bytes(b, l, d, N_STATE, jnp.dtype(dtype).itemsize) / row["fwd_s"] / 1e9
    if check_against is not None:
        row["rel_err_y_vs_first"] = rel_err(y[0], check_against[0])
    return row, y


def fmt_row(r, ceiling):
    def ms(x):
        return "" if x is None else f"{x * 1e3:.3f}"

    def gib(x):
        return "" if x is None else f"{x / 2**30:.2f}"

    if "skipped" in r:
        return f"| {r['impl']} | {r['b']} | {r['l']} | {r['d']} | skipped: {r['skipped']} | | | | |"
    frac = r["fwd_GBps"] * 1e9 / ceiling
    err = r.get("rel_err_y_vs_first")
    return (
        f"| {r['impl']} | {r['b']} | {r['l']} | {r['d']} | {ms(r['fwd_s'])} | {ms(r['fwd_bwd_s'])} | "
        f"{gib(r.get('peak_fwd_bwd_bytes'))} | {r['fwd_GBps']:.1f} ({100 * frac:.1f}%) | "
        f"{'' if err is None else f'{err:.1e}'} |"
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    p.add_argument("--out", default=None, help="results directory (default results/; with --quick a temporary one)")
    a = p.parse_args()
    tag = device_tag()
    on_gpu = jax.devices()[0].platform == "gpu"
    notes = []
    if on_gpu:
        shapes, impls, dtype = GPU_SHAPES, GPU_IMPLS, jnp.bfloat16
        stats = jax.devices()[0].memory_stats() or {}
        mem_limit = int(0.85 * stats.get("bytes_limit", 80 * 2**30))
        ceiling = copy_bandwidth(2 * 2**30)
        try:
            import mamba_ssm  # noqa: F401

            notes.append("mamba_ssm is importable but not timed by this script yet")
        except Exception as e:  # noqa: BLE001
            notes.append(f"mamba_ssm (reference CUDA kernel) not importable here: {type(e).__name__}: {e}")
    else:
        shapes, impls, dtype = CPU_SHAPES, CPU_IMPLS, jnp.float32
        mem_limit = None
        ceiling = copy_bandwidth(256 * 2**20)
        notes.append("CPU: XLA impls and the native CPU kernel (the Pallas kernel runs interpreted on CPU; "
                     "not a speed claim)")
    if a.quick:
        shapes = [(1, 256, 256), (1, 1024, 256)]
    print(f"device {jax.devices()[0].device_kind} ({tag}); copy ceiling {ceiling / 1e9:.1f} GB/s", flush=True)

    tuned = None
    tune_rows = []
    if on_gpu and "pallas" in impls:
        shape = (1, 2048, 1024) if a.quick else GPU_TUNE_SHAPE
        for w, nw in GPU_TUNE:
            bs = SelectiveScanBlockSizes(gpu_block_d=w, num_warps=nw)
            r, _ = bench_one("pallas", shape, dtype, mem_limit, block_sizes=bs)
            r.update(block_d=w, num_warps=nw)
            tune_rows.append(r)
            print("tune", w, nw, r.get("fwd_s"), r.get("fwd_bwd_s"), r.get("skipped", ""), flush=True)
        ok = [r for r in tune_rows if "fwd_bwd_s" in r]
        if ok:
            best = min(ok, key=lambda r: r["fwd_bwd_s"])
            tuned = SelectiveScanBlockSizes(gpu_block_d=best["block_d"], num_warps=best["num_warps"])
            notes.append(f"pallas block sizes picked by the sweep at {shape}: {tuned}")

    rows = []
    slow = {}  # (impl, b, d) -> (l, fwd seconds) of the last measurement
    for shape in shapes:
        first = None
        for impl in impls:
            b, l, d = shape
            prev = slow.get((impl, b, d))
            if on_gpu and prev is not None and prev[1] > SLOW_SKIP_S:
                r = dict(impl=impl, b=b, l=l, d=d, n=N_STATE, dtype=jnp.dtype(dtype).name,
                         skipped=f"forward took {prev[1]:.1f} s already at l={prev[0]}")
                rows.append(r)
                print(fmt_row(r, ceiling), flush=True)
                continue
            r, y = bench_one(impl, shape, dtype, mem_limit, block_sizes=tuned if impl == "pallas" else None,
                             check_against=first)
            if "fwd_s" in r:
                slow[(impl, b, d)] = (l, r["fwd_s"])
            if first is None and y is not None:
                first = y
                r["reference_for_error"] = True
            rows.append(r)
            print(fmt_row(r, ceiling), flush=True)

    lines = [
        f"Device: {jax.devices()[0].device_kind} ({tag}); inputs {jnp.dtype(dtype).name}, n={N_STATE}; "
        f"copy ceiling {ceiling / 1e9:.1f} GB/s",
        "",
        "| impl | b | l | d | fwd ms | fwd+bwd ms | peak fwd+bwd GiB | fwd GB/s (% of copy) | rel err y vs first impl |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + [fmt_row(r, ceiling) for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    for note in notes:
        print("note:", note)

    if a.out is None:  # a --quick run never writes into the committed results
        import tempfile

        a.out = tempfile.mkdtemp(prefix="bench_scan_quick_") if a.quick else RESULTS
    os.makedirs(a.out, exist_ok=True)
    suffix = "_quick" if a.quick else ""
    out = dict(device=jax.devices()[0].device_kind, tag=tag, jax=jax.__version__, copy_GBps=ceiling / 1e9,
               dtype=jnp.dtype(dtype).name, rows=rows, tune=tune_rows, notes=notes, table=table)
    with open(os.path.join(a.out, f"bench_scan_{tag}{suffix}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    plot(rows, os.path.join(a.out, f"bench_scan_{tag}{suffix}.png"), tag)


def plot(rows, path, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["b"], r["d"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (b, d) in zip(axes[0], groups):
        for impl in sorted({r["impl"] for r in rows}):
            pts = [(r["l"], r["fwd_bwd_s"]) for r in rows if (r["b"], r["d"], r["impl"]) == (b, d, impl) and "fwd_bwd_s" in r]
            if pts:
                ls, ts = zip(*sorted(pts))
                ax.loglog(ls, [t * 1e3 for t in ts], "o-", label=impl)
        ax.set_xlabel("sequence length l")
        ax.set_ylabel("forward+backward ms")
        ax.set_title(f"{tag}: b={b}, d={d}, n={N_STATE}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
