# %% [markdown]
# # SSD on a GPU: the Pallas Triton kernel, the chunked XLA scan and the reference's Triton SSD
#
# Side by side in one run, on one GPU (named in the JSON): forward and
# forward+backward time of
#
# * `pallas`   `pallas_kernels.ssd.ops.ssd_pallas(platform="gpu")` (Pallas Triton kernels),
# * `chunked`  `mamba_jax.ops.ssd(impl="chunked")` (XLA),
# * `mamba_ssm` `mamba_chunk_scan_combined` from the mamba-ssm source (its Triton
#   files, imported without the package's CUDA extension), when torch with CUDA,
#   triton and einops are importable and `--mamba-ssm-src` (or an installed
#   mamba_ssm) provides the files.
#
# Every row also records the first GPU correctness check of the Pallas kernel:
# its y, final state and gradients against `chunked` on the same bf16 inputs,
# and mamba_ssm's y against `chunked`. Compiled peak memory comes from XLA's
# memory analysis (JAX) and `torch.cuda.max_memory_allocated` (torch). A copy
# of a large buffer measured in the same run gives the bandwidth ceiling.
#
#     python experiments/bench_ssd_gpu.py --out experiments/results [--mamba-ssm-src /path/to/mamba]
#
# Without a GPU it stops with a message (no estimate is made).

# %%
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mamba_jax as mj  # noqa: E402
from pallas_kernels.ssd.ops import ssd_pallas  # noqa: E402

# Hyperparameters --------------------------------------------------------------
# Mamba-2 shapes: 24 heads x 64 (d_model 768, mamba2-130m) and 80 heads x 64
# (d_model 2560, mamba2-2.7b); d_state 128, 1 group, chunk 256, bf16 inputs.
CONFIGS = {
    "h24": dict(h=24, p=64, g=1, n=128),
    "h80": dict(h=80, p=64, g=1, n=128),
}
SHAPES = [(1, l) for l in (512, 2048, 8192, 32768)] + [(8, 2048)]  # (b, l)
QUICK_SHAPES = [(1, 512)]
CHUNK = 256
DTYPE = jnp.bfloat16
TIME_BUDGET_S = 0.5  # per measurement, after warm-up
MAX_REPEATS = 50
COPY_BYTES = 1 << 30


# %%
def require_gpu():
    if jax.default_backend() != "gpu":
        sys.exit(
            f"bench_ssd_gpu needs a GPU: jax.default_backend() is {jax.default_backend()!r} "
            f"(devices {jax.devices()}). Install jax with CUDA (jax[cuda12]) on a GPU machine; "
            "no number is estimated without one."
        )


def make_inputs(b, l, h, p, g, n, seed=0):
    ks = jax.random.split(jax.random.key(seed), 9)
    normal = lambda k, s: jax.random.normal(k, s, jnp.float32)
    return dict(
        x=normal(ks[0], (b, l, h, p)).astype(DTYPE),
        dt=(-2.0 + 0.5 * normal(ks[1], (b, l, h))).astype(DTYPE),
        A=-jnp.exp(0.5 * normal(ks[2], (h,))),
        B=normal(ks[3], (b, l, g, n)).astype(DTYPE),
        C=normal(ks[4], (b, l, g, n)).astype(DTYPE),
        D=normal(ks[5], (h,)),
        z=normal(ks[6], (b, l, h, p)).astype(DTYPE),
        dt_bias=0.5 * normal(ks[7], (h,)),
    )


def jax_forward(impl):
    if impl == "pallas":
        return lambda a: ssd_pallas(**a, dt_softplus=True, platform="gpu", chunk_size=CHUNK)
    return lambda a: mj.ops.ssd(**a, chunk_size=CHUNK, dt_softplus=True, return_final_state=True, impl=impl)


def jax_grad(f, cot):
    def loss(a):
        y, hT = f(a)
        return jnp.sum(y.astype(jnp.float32) * cot) + jnp.sum(hT)

    return jax.grad(loss)


def compile_with_peak(f, *args):
    c = jax.jit(f).lower(*args).compile()
    m = c.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return c, int(peak)


def median_time(run, sync):
    sync(run())  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < MAX_REPEATS and (not times or time.perf_counter() - start < TIME_BUDGET_S):
        t = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def copy_bandwidth():
    """Bytes read + written per second by x -> 2x over a 1 GiB float32 buffer (the ceiling)."""
    x = jnp.ones((COPY_BYTES // 4,), jnp.float32)
    c = jax.jit(lambda v: v * 2.0).lower(x).compile()
    return 2 * COPY_BYTES / median_time(lambda: c(x), jax.block_until_ready)


# %%
def load_mamba_ssm(src: str | None):
    """mamba_chunk_scan_combined from the mamba-ssm Triton files, or (None, reason).

    With ``src`` (a mamba source tree or unpacked sdist), the packages
    ``mamba_ssm``, ``mamba_ssm.ops`` and ``mamba_ssm.ops.triton`` are registered
    as empty namespaces over its folders, so their ``__init__`` (which imports
    the CUDA extension) never runs.
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "torch has no CUDA device"
        if src is not None:
            base = Path(src).resolve() / "mamba_ssm"
            if not (base / "ops" / "triton" / "ssd_combined.py").exists():
                return None, f"{base}/ops/triton/ssd_combined.py not found"
            for name, path in (("mamba_ssm", base), ("mamba_ssm.ops", base / "ops"),
                               ("mamba_ssm.ops.triton", base / "ops" / "triton")):
                mod = types.ModuleType(name)
                mod.__path__ = [str(path)]
                sys.modules[name] = mod
        module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        return module.mamba_chunk_scan_combined, None
    except Exception as e:  # reported in the JSON, never silently
        return None, f"{type(e).__name__}: {e}"


def torch_rows(fn, a, cot):
    """mamba_chunk_scan_combined's forward and forward+backward time, peak memory, y."""
    import torch

    dev = torch.device("cuda")
    t = lambda v: torch.from_numpy(np.array(v.astype(jnp.float32))).to(dev)  # a writable copy
    bf = lambda v: t(v).to(torch.bfloat16)
    x, dt, B, C, z = (bf(a[k]) for k in ("x", "dt", "B", "C", "z"))
    A, D, bias = t(a["A"]), t(a["D"]), t(a["dt_bias"])
    cot_t = t(cot)

    def fwd():
        return fn(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=bias, dt_softplus=True, return_final_states=True)

    leaves = [x, dt, A, B, C, D, z, bias]

    def fwd_bwd():
        for v in leaves:
            v.requires_grad_(True)
            v.grad = None
        y, hT = fwd()
        ((y.float() * cot_t).sum() + hT.float().sum()).backward()
        return y

    sync = lambda _: torch.cuda.synchronize()
    with torch.no_grad():
        y = fwd()[0]
        torch.cuda.reset_peak_memory_stats()
        fwd_s = median_time(fwd, sync)
        peak_f = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd_s = median_time(fwd_bwd, sync)
    peak_b = torch.cuda.max_memory_allocated()
    return dict(fwd_s=fwd_s, fwd_bwd_s=fwd_bwd_s, peak_fwd_bytes=peak_f, peak_fwd_bwd_bytes=peak_b), \
        y.float().cpu().numpy()


# %%
def bench(name, b, l, mamba_fn):
    cfg = CONFIGS[name]
    a = make_inputs(b, l, **cfg)
    cot = jax.random.normal(jax.random.key(1), a["x"].shape, jnp.float32)
    io_bytes = sum(int(a[k].nbytes) for k in ("x", "dt", "B", "C", "z")) + int(a["x"].nbytes)
    rows, outs = [], {}
    for impl in ("chunked", "pallas"):
        f = jax_forward(impl)
        cf, peak_f = compile_with_peak(f, a)
        cb, peak_b = compile_with_peak(jax_grad(f, cot), a)
        outs[impl] = (cf(a), cb(a))
        fwd_s = median_time(lambda: cf(a), jax.block_until_ready)
        rows.append(dict(config=name, b=b, l=l, impl=impl, **cfg, fwd_s=fwd_s,
                         fwd_bwd_s=median_time(lambda: cb(a), jax.block_until_ready),
                         peak_fwd_bytes=peak_f, peak_fwd_bwd_bytes=peak_b, fwd_bytes_per_s=io_bytes / fwd_s))
    (y_c, h_c), g_c = outs["chunked"]
    (y_p, h_p), g_p = outs["pallas"]
    rows[1]["vs_chunked"] = dict(y=rel(y_p, y_c), final_state=rel(h_p, h_c),
                                 **{f"d{k}": rel(g_p[k], g_c[k]) for k in g_c})
    rows[1]["finite"] = bool(jnp.all(jnp.isfinite(y_p)))
    if mamba_fn is not None:
        times, y_m = torch_rows(mamba_fn, a, cot)
        rows.append(dict(config=name, b=b, l=l, impl="mamba_ssm", **cfg, **times,
                         fwd_bytes_per_s=io_bytes / times["fwd_s"], vs_chunked=dict(y=rel(y_m, y_c))))
    for r in rows:
        print(f"{r['config']:>4} b={b} l={l:>6} {r['impl']:>9}: fwd {1e3 * r['fwd_s']:8.3f} ms  "
              f"fwd+bwd {1e3 * r['fwd_bwd_s']:8.3f} ms  {r.get('vs_chunked', '')}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory for bench_ssd_gpu_<gpu>.json")
    parser.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    parser.add_argument("--mamba-ssm-src", default=None, help="mamba source tree (its mamba_ssm/ops/triton files)")
    args = parser.parse_args()
    require_gpu()
    mamba_fn, why_not = load_mamba_ssm(args.mamba_ssm_src)
    if why_not:
        print(f"mamba_ssm's Triton SSD not run: {why_not}")
    device = jax.devices()[0].device_kind
    ceiling = copy_bandwidth()
    rows = []
    for b, l in QUICK_SHAPES if args.quick else SHAPES:
        for name in CONFIGS:
            try:
                rows += bench(name, b, l, mamba_fn)
            except Exception as e:  # e.g. out of memory at the longest l: recorded, not hidden
                rows.append(dict(config=name, b=b, l=l, error=f"{type(e).__name__}: {str(e)[:500]}"))
                print(f"{name} b={b} l={l}: {rows[-1]['error']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(ch for ch in device.lower().replace(" ", "_") if ch.isalnum() or ch == "_")
    path = out / f"bench_ssd_gpu_{tag}{'_quick' if args.quick else ''}.json"
    payload = dict(experiment="bench_ssd_gpu", quick=args.quick, device=device, jax=jax.__version__,
                   date=time.strftime("%Y-%m-%d"), chunk=CHUNK, dtype="bfloat16", copy_bytes_per_s=ceiling,
                   mamba_ssm=why_not or "run", rows=rows)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
