# %% [markdown]
# # The SSD (Mamba-2) compiled for TPU on a CPU host (deviceless AOT)
#
# libtpu (the `tpu` extra) brings the real XLA:TPU and Mosaic compilers. This
# script compiles `mamba_jax.ops.ssd(impl="auto")` — forward, and the gradient
# of every input — for TPU topologies at Mamba-2 shapes (24 and 80 heads of
# 64 channels, n = 64 and 128, 1 and 8 groups, chunk 256, l = 2048, 4096,
# unaligned and shorter than one chunk, bf16 and f32, with D, z, dt bias and
# softplus, an initial state, and on some cases packed documents and a dt
# clamp) and records per case whether it compiled, how many Mosaic kernel
# calls the compiled program holds (auto must embed the SSD kernel: 1 forward,
# 2 with the backward), the VMEM estimate of `pallas_kernels/ssd/block_sizes.py`
# and XLA's memory analysis (with `--compare-chunked`, also the temp bytes of
# the gradient through the chunked XLA path at COMPARE_CASES, same compiler).
# Nothing runs: numerics come from interpret mode (tests/test_pallas_ssd.py),
# speed only from hardware, which we have not had.
#
#     python experiments/tpu_compile_ssd.py                    # every topology -> results/tpu_compile_ssd.json
#     python experiments/tpu_compile_ssd.py --topology v5e:2x2 --compare-chunked \
#         --json experiments/results/tpu_compile_ssd_vs_chunked.json       # + the chunked XLA path's memory
#     python experiments/tpu_compile_ssd.py --topology v5e:2x2 --ci --json /tmp/v5e.json   # the tests' subset

# %%
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this is not a TPU VM
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compile processes at once (pytest -n)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mamba_jax as mj  # noqa: E402
from pallas_kernels.ssd.block_sizes import TPU_VMEM_LIMIT_BYTES, tpu_vmem_bytes  # noqa: E402
from pallas_kernels.ssd.ops import kernel_chunk  # noqa: E402
from tpu_compile import save_rows  # noqa: E402

# Hyperparameters --------------------------------------------------------------
TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2")
CHUNK = 256
P = 64  # head dim of every Mamba-2 preset
# (name, b, l, h, n, g, dtype, passes, docs, dt_limit). docs: packed documents (seq_idx) given.
CASES = [
    ("h24_n128_g1_l2048_f32", 1, 2048, 24, 128, 1, "float32", ("fwd", "grad"), False, None),
    ("h24_n64_g1_l4096_bf16", 1, 4096, 24, 64, 1, "bfloat16", ("fwd", "grad"), False, None),
    ("h80_n128_g8_l4096_bf16", 1, 4096, 80, 128, 8, "bfloat16", ("fwd", "grad"), False, None),
    ("h80_n64_g8_l2048_f32_docs", 2, 2048, 80, 64, 8, "float32", ("grad",), True, None),
    ("h24_n128_g8_l2000_bf16_docs_limit", 2, 2000, 24, 128, 8, "bfloat16", ("fwd", "grad"), True, (0.001, 0.1)),
    ("h80_n128_g1_l1003_f32", 1, 1003, 80, 128, 1, "float32", ("grad",), False, None),
    ("h24_n64_g1_l100_bf16_docs", 2, 100, 24, 64, 1, "bfloat16", ("fwd", "grad"), True, None),
]
# The subset tests/test_tpu_compile.py compiles per topology (CI time): both state
# sizes, both group counts, aligned, unaligned and single-chunk lengths, both dtypes.
CI_CASES = ("h24_n64_g1_l4096_bf16", "h24_n128_g8_l2000_bf16_docs_limit", "h24_n64_g1_l100_bf16_docs")
# With --compare-chunked, the gradient of these cases is also compiled through the
# chunked XLA path (slow to compile: minutes per case on a loaded 2-core host).
COMPARE_CASES = ("h24_n128_g1_l2048_f32", "h24_n64_g1_l100_bf16_docs")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# %%
def compile_case(dev, b, l, h, n, g, dtype, pass_, docs, dt_limit, impl="auto"):
    """Compiles one case for the TPU device ``dev``; returns a result dict."""
    from jax.sharding import SingleDeviceSharding

    dt_ = jnp.dtype(dtype)
    spec = lambda shape, t=dt_: jax.ShapeDtypeStruct(shape, t, sharding=SingleDeviceSharding(dev))
    f32 = jnp.float32
    args = (
        spec((b, l, h, P)), spec((b, l, h)), spec((h,), f32), spec((b, l, g, n)), spec((b, l, g, n)),
        spec((h,), f32), spec((b, l, h, P)), spec((h,), f32), spec((b, h, P, n), f32),
    )
    seq_idx = spec((b, l), jnp.int32) if docs else None
    limit = dt_limit or (0.0, float("inf"))

    def forward(x, dt, A, B, C, D, z, bias, h0, seq=None):
        return mj.ops.ssd(
            x, dt, A, B, C, chunk_size=CHUNK, D=D, z=z, dt_bias=bias, dt_softplus=True, dt_limit=limit,
            initial_state=h0, seq_idx=seq, return_final_state=True, impl=impl,
        )

    def loss(*a):
        y, hT = forward(*a)
        return jnp.sum(y.astype(f32)) + jnp.sum(hT)

    fn = forward if pass_ == "fwd" else jax.grad(loss, argnums=tuple(range(len(args))))
    all_args = args + ((seq_idx,) if docs else ())
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).trace(*all_args).lower(lowering_platforms=("tpu",)).compile()
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:600]}", "compile_s": round(time.perf_counter() - t0, 2)}
    seconds = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    return {
        "ok": True,
        "compile_s": seconds,
        "kernel_calls": text.count("tpu_custom_call"),
        "ssd_kernels": [k for k in ("ssd_fwd_tpu", "ssd_bwd_tpu") if k in text],  # the calls are ours
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None),
    }


def run_topology(topology: str, ci: bool = False, compare: bool = False) -> list[dict]:
    from jax.experimental import topologies

    dev = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    rows = []
    for name, b, l, h, n, g, dtype, passes, docs, dt_limit in CASES:
        if ci and name not in CI_CASES:
            continue
        T = kernel_chunk("tpu", l, CHUNK)
        for pass_ in passes:
            row = dict(topology=topology, case=name, b=b, l=l, h=h, p=P, n=n, g=g, dtype=dtype, pass_=pass_,
                       seq_idx=docs, dt_limit=dt_limit, chunk=T,
                       auto=mj.ops.resolve_ssd_impl("tpu", n, l, headdim=P, chunk_size=CHUNK),
                       vmem_estimate_bytes=tpu_vmem_bytes("bwd" if pass_ == "grad" else "fwd", T, P, n),
                       vmem_limit_bytes=TPU_VMEM_LIMIT_BYTES)
            row.update(compile_case(dev, b, l, h, n, g, dtype, pass_, docs, dt_limit))
            if compare and pass_ == "grad" and name in COMPARE_CASES:  # the XLA path's memory, same compiler, same case
                xla = compile_case(dev, b, l, h, n, g, dtype, pass_, docs, dt_limit, impl="chunked")
                row["chunked_temp_bytes"] = xla.get("temp_bytes")
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows) -> str:
    mib = lambda v: "" if v is None else f"{v / 2**20:.0f}"
    out = [
        "| topology | case | pass | compiled | Mosaic calls | compile s | temp MiB | chunked temp MiB | args MiB "
        "| out MiB | VMEM est. MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['topology']} | {r['case']} | {r['pass_']} | {'yes' if r['ok'] else 'NO'} | {r.get('kernel_calls', '')} "
            f"| {r['compile_s']} | {mib(r.get('temp_bytes'))} | {mib(r.get('chunked_temp_bytes'))} "
            f"| {mib(r.get('argument_bytes'))} "
            f"| {mib(r.get('output_bytes'))} | {r['vmem_estimate_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(out)


# %%
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topology", action="append", help="one of %s (repeatable; default: all)" % (TOPOLOGIES,))
    parser.add_argument("--ci", action="store_true", help="only CI_CASES (what tests/test_tpu_compile.py compiles)")
    parser.add_argument("--compare-chunked", action="store_true",
                        help="also compile impl='chunked' for the gradients of COMPARE_CASES; record its temp bytes")
    parser.add_argument("--json", default=os.path.join(RESULTS, "tpu_compile_ssd.json"))
    args = parser.parse_args()
    rows = []
    for topology in args.topology or TOPOLOGIES:
        rows += run_topology(topology, ci=args.ci, compare=args.compare_chunked)
    return save_rows("tpu_compile_ssd", rows, table(rows), args.json)


if __name__ == "__main__":
    sys.exit(main())
