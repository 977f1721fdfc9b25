# %% [markdown]
# # The selective scan compiled for TPU on a CPU host (deviceless AOT)
#
# libtpu (the `tpu` extra) brings the real XLA:TPU and Mosaic compilers. This
# script compiles `mamba_jax.ops.selective_scan(impl="auto")` — forward, and
# the gradient of every input — for TPU topologies at the shapes real models
# use, and records per case whether it compiled, how many kernel calls the
# compiled program holds (auto must embed the Pallas kernel: 1 forward,
# 2 with the backward), the channel tile and VMEM estimate of
# `block_sizes.py`, and XLA's memory analysis. Nothing runs: numerics come
# from interpret mode (tests/test_pallas_selective_scan.py), speed only from
# hardware, which we have not had.
#
#     python experiments/tpu_compile.py                      # every topology -> results/tpu_compile.json
#     python experiments/tpu_compile.py --topology v5e:2x2 --json /tmp/v5e.json   # one (the tests)

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
from pallas_kernels.selective_scan.block_sizes import (  # noqa: E402
    TPU_VMEM_LIMIT_BYTES,
    SelectiveScanBlockSizes,
    tpu_vmem_bytes,
)

# Hyperparameters --------------------------------------------------------------
TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2")
# (name, b, l, d, n, g, dtype, passes). d = the presets' d_inner (130m ... 2.8b);
# the VMEM footprint depends on (n, tile) only, so every n runs at full tile
# width (d = 2048) in both passes, and every width once with rotating n.
CASES = [
    ("n16", 1, 2048, 2048, 16, 1, "float32", ("fwd", "grad")),
    ("n64", 1, 2048, 2048, 64, 1, "float32", ("fwd", "grad")),
    ("n128", 1, 2048, 2048, 128, 1, "float32", ("fwd", "grad")),
    ("d1536_n16_bf16", 2, 4096, 1536, 16, 1, "bfloat16", ("grad",)),
    ("d3072_n64_bf16", 2, 2048, 3072, 64, 1, "bfloat16", ("grad",)),
    ("d4096_n128", 1, 4096, 4096, 128, 1, "float32", ("grad",)),
    ("d5120_n16_bf16", 2, 2048, 5120, 16, 1, "bfloat16", ("grad",)),
    ("l2000_g2_n64_bf16", 2, 2000, 2048, 64, 2, "bfloat16", ("grad",)),
    ("l1003_g4_n128", 1, 1003, 1536, 128, 4, "float32", ("grad",)),
    # Packed documents (seq_idx -> the kernels' continuation mask, an SMEM row per time block).
    ("n16_packed", 1, 2048, 2048, 16, 1, "float32", ("fwd", "grad")),
    ("n64_packed_bf16", 2, 2048, 2048, 64, 1, "bfloat16", ("grad",)),
    ("l1003_g4_n128_packed_bf16", 1, 1003, 1536, 128, 4, "bfloat16", ("grad",)),
]
PACKED = frozenset(c[0] for c in CASES if "packed" in c[0])
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# %%
def compile_case(dev, b, l, d, n, g, dtype, pass_, packed=False):
    """Compiles one case for the TPU device ``dev``; returns a result dict. ``packed``:
    with ``seq_idx`` (documents of 100 tokens), not differentiated."""
    from jax.sharding import SingleDeviceSharding

    dt = jnp.dtype(dtype)
    spec = lambda shape, t=dt: jax.ShapeDtypeStruct(shape, t, sharding=SingleDeviceSharding(dev))
    bc = (b, l, n) if g == 1 else (b, l, g, n)
    args = (
        spec((b, l, d)), spec((b, l, d)), spec((d, n), jnp.float32), spec(bc), spec(bc),
        spec((d,), jnp.float32), spec((b, l, d)), spec((d,), jnp.float32), spec((b, d, n), jnp.float32),
    )

    seq_idx = (jnp.arange(l, dtype=jnp.int32) // 100)[None].repeat(b, 0) if packed else None

    def forward(u, delta, A, B, C, D, z, bias, h0):
        return mj.ops.selective_scan(
            u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True,
            initial_state=h0, return_final_state=True, impl="auto", seq_idx=seq_idx,
        )

    def loss(*a):
        y, h = forward(*a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    fn = forward if pass_ == "fwd" else jax.grad(loss, argnums=tuple(range(len(args))))
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}", "compile_s": time.perf_counter() - t0}
    mem = compiled.memory_analysis()
    return {
        "ok": True,
        "compile_s": round(time.perf_counter() - t0, 2),
        "kernel_calls": compiled.as_text().count("tpu_custom_call"),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    }


def run_topology(topology: str) -> list[dict]:
    from jax.experimental import topologies

    dev = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    bs = SelectiveScanBlockSizes()
    rows = []
    for name, b, l, d, n, g, dtype, passes in CASES:
        tile = bs.tpu_tile(d // g, n)
        for pass_ in passes:
            row = dict(topology=topology, case=name, b=b, l=l, d=d, n=n, g=g, dtype=dtype, pass_=pass_, packed=name in PACKED,
                       block_l=bs.block_l, tile=tile,
                       vmem_estimate_bytes=tpu_vmem_bytes("bwd" if pass_ == "grad" else "fwd", bs.block_l, tile, n),
                       vmem_limit_bytes=TPU_VMEM_LIMIT_BYTES)
            row.update(compile_case(dev, b, l, d, n, g, dtype, pass_, packed=name in PACKED))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows) -> str:
    out = ["| topology | case | pass | tile | VMEM estimate MiB | compiled | kernel calls | s |", "|---|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['topology']} | {r['case']} | {r['pass_']} | {r['tile']} | {r['vmem_estimate_bytes'] / 2**20:.1f} "
            f"| {'yes' if r['ok'] else 'NO'} | {r.get('kernel_calls', '')} | {r['compile_s']} |"
        )
    return "\n".join(out)


# %%
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topology", action="append", help="one of %s (repeatable; default: all)" % (TOPOLOGIES,))
    parser.add_argument("--json", default=os.path.join(RESULTS, "tpu_compile.json"))
    args = parser.parse_args()
    rows = []
    for topology in args.topology or TOPOLOGIES:
        rows += run_topology(topology)
    return save_rows("tpu_compile", rows, table(rows), args.json)


def save_rows(experiment: str, rows: list[dict], table_text: str, path: str) -> int:
    """Writes the compile table's JSON, prints it; the exit status is 0 only if every case compiled."""
    payload = {
        "experiment": experiment,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "note": "deviceless AOT compile with libtpu on a CPU host; nothing was run on a TPU",
        "rows": rows,
        "table": table_text,
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(table_text)
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
