# %% [markdown]
# # Does it fit on a pod? The sharded train step compiled for TPU slices on a CPU host
#
# Deviceless ahead-of-time compilation (DESIGN.md): libtpu's real XLA:TPU and
# Mosaic compilers build the whole sharded AdamW train step of `mamba_jax.train`
# (forward, backward through the Pallas selective-scan kernel under `shard_map`,
# optimizer update; state donated) for a TPU topology, here a v5e 4x4 slice (16
# chips, 16 GiB HBM each), with the model's parameters and optimizer state laid
# out by `mamba_jax.sharding` (FSDP; sequence parallelism for a long context).
# Nothing runs: the table holds what the compiler reports — memory per chip
# (`memory_analysis`: arguments, outputs, temporaries; the compile fails when the
# program does not fit the chip's HBM), FLOPs per chip of the compiled program
# (`cost_analysis`, which counts a scanned block once and a Pallas kernel as
# nothing: a lower bound) and the compile time on this (loaded, 2-core) CPU host. The
# model FLOPs column (6 x parameters x tokens) is an analytical estimate, and
# throughput on real chips is a projection we cannot measure here.
#
# A second table compiles a smaller model's train step for 8 forced CPU devices
# under several mesh layouts: memory per device against the layout.
#
#     python experiments/aot_pod.py                 # every TPU case -> results/aot_pod.json (resumes)
#     python experiments/aot_pod.py --cpu           # the 8-CPU-device layout table -> results/aot_pod_cpu.json
#     python experiments/aot_pod.py --case NAME     # one case (repeatable)
#     python experiments/aot_pod.py --quick         # a tiny model on v5e:2x2, to a temporary file

# %%
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

if "--cpu" in sys.argv:  # fixed when jax starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this is not a TPU VM
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import mamba_jax as mj  # noqa: E402
from mamba_jax import sharding as mjs  # noqa: E402
from mamba_jax.train import _pure_train_step, make_optimizer  # noqa: E402

# Hyperparameters --------------------------------------------------------------
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HBM_GIB = {"v5e": 16, "v4": 32, "v5p": 95, "v6e": 32}
# (name, preset, config overrides, topology, mesh axes, global batch, seq_len). bfloat16
# compute, float32 parameters and AdamW moments. "scan+remat": MambaConfig(scan_layers=True,
# remat="full"), one scanned block rematerialised in the backward.
SCAN_REMAT = dict(scan_layers=True, remat="full")
TPU_CASES = [
    ("mamba-1.4b fsdp16 b16 l1024", "mamba_1_4b", {}, "v5e:4x4", dict(fsdp=16), 16, 1024),
    ("mamba-1.4b fsdp16 b16 l2048 scan+remat", "mamba_1_4b", SCAN_REMAT, "v5e:4x4", dict(fsdp=16), 16, 2048),
    ("mamba-2.8b fsdp16 b16 l2048 scan+remat", "mamba_2_8b", SCAN_REMAT, "v5e:4x4", dict(fsdp=16), 16, 2048),
    ("mamba2-1.3b fsdp16 b16 l2048 scan+remat", "mamba2_1_3b", SCAN_REMAT, "v5e:4x4", dict(fsdp=16), 16, 2048),
    ("mamba-1.4b fsdp4 seq4 b4 l32768 scan+remat", "mamba_1_4b", SCAN_REMAT, "v5e:4x4", dict(fsdp=4, sequence=4), 4, 32768),
    ("mamba-1.4b data16 b16 l2048 scan+remat", "mamba_1_4b", SCAN_REMAT, "v5e:4x4", dict(data=16), 16, 2048),
    ("mamba-2.8b fsdp16 b16 l1024", "mamba_2_8b", {}, "v5e:4x4", dict(fsdp=16), 16, 1024),
]
CPU_PRESET = ("mamba_130m", dict(n_layer=4, scan_layers=True))
CPU_LAYOUTS = [dict(data=8), dict(fsdp=8), dict(tensor=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=4),
               dict(fsdp=2, sequence=4)]
CPU_BATCH, CPU_SEQ = 8, 512


# %%
def train_step_compiled(config, mesh, batch, seq_len, lowering_platforms=None):
    """Compile the sharded AdamW train step (state donated) for ``mesh``; returns
    ``(compiled, parameter count, seconds)``. Nothing is allocated: shapes only."""

    def build():
        model = mj.MambaLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        return model, make_optimizer(model)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    shardings = mjs.shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(build)[0], nnx.Param)))
    batch_sharding = mjs.batch_sharding(mesh, 2)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding)
    batch_spec = {"inputs": tokens, "targets": tokens,
                  "weights": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=batch_sharding)}
    step = jax.jit(
        functools.partial(_pure_train_step, graphdef, 1),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        traced = step.trace(state, batch_spec)
        lowered = traced.lower(lowering_platforms=lowering_platforms) if lowering_platforms else traced.lower()
        compiled = lowered.compile()
    return compiled, n_params, time.perf_counter() - t0


def analysis(compiled) -> dict:
    mem = compiled.memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    row = {n.replace("_size_in_bytes", "_bytes"): int(getattr(mem, n, 0) or 0) for n in names}
    # Donated outputs alias their arguments: count them once.
    row["total_bytes"] = row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row["flops_per_chip"] = float(cost.get("flops", float("nan"))) if cost else None
    row["kernel_calls"] = compiled.as_text().count("tpu_custom_call")
    return row


def run_tpu_case(name, preset, overrides, topology, axes, batch, seq_len) -> dict:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = mjs.make_mesh(**axes, devices=devices)
    config = getattr(mj.MambaConfig, preset)(**overrides)
    row = dict(case=name, preset=preset, overrides=overrides, topology=topology, chips=len(devices), mesh=dict(mesh.shape),
               batch=batch, seq_len=seq_len, dtype="bfloat16 compute, float32 params + AdamW")
    t0 = time.perf_counter()
    try:
        compiled, n_params, seconds = train_step_compiled(config, mesh, batch, seq_len, ("tpu",))
    except Exception as e:  # noqa: BLE001 - a program that does not fit is a result
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}", compile_s=round(time.perf_counter() - t0, 1))
        return row
    row.update(ok=True, params=n_params, compile_s=round(seconds, 1), **analysis(compiled))
    row["hbm_gib"] = HBM_GIB[topology.split(":")[0]]
    row["model_flops_estimate_per_chip"] = 6.0 * n_params * batch * seq_len / len(devices)
    return row


def run_cpu_layouts() -> list[dict]:
    assert len(jax.devices()) == 8, "run with --cpu (8 forced CPU devices)"
    preset, kw = CPU_PRESET
    config = getattr(mj.MambaConfig, preset)(**kw)
    rows = []
    for axes in CPU_LAYOUTS:
        mesh = mjs.make_mesh(**axes)
        compiled, n_params, seconds = train_step_compiled(config, mesh, CPU_BATCH, CPU_SEQ)
        row = dict(case="cpu " + "_".join(f"{k}{v}" for k, v in axes.items()), preset=f"{preset} {kw}",
                   mesh=dict(mesh.shape), batch=CPU_BATCH, seq_len=CPU_SEQ, params=n_params, ok=True,
                   compile_s=round(seconds, 1), **analysis(compiled))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    # total (arguments + temporaries + unaliased outputs) against the chip's HBM; the
    # compiler itself refuses a program whose temporaries alone exceed it.
    fits = lambda r: "" if "hbm_gib" not in r else ("yes" if r["total_bytes"] <= r["hbm_gib"] * 2**30 else "NO (total > HBM)")
    out = ["| case | mesh | params | args GiB/chip | temp GiB/chip | total GiB/chip | within HBM | "
           "TFLOP/chip (XLA cost analysis*) | TFLOP/chip (6ND estimate) | compile s |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1)
        if not r["ok"]:
            out.append(f"| {r['case']} | {mesh} | | | | does not compile: {r['error'][:120]} | no | | | {r['compile_s']} |")
            continue
        est = r.get("model_flops_estimate_per_chip")
        out.append(
            f"| {r['case']} | {mesh} | {r['params'] / 1e9:.2f} B | {gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} "
            f"| {gib(r['total_bytes'])} | {fits(r)} | {r['flops_per_chip'] / 1e12:.1f} | {'' if est is None else f'{est / 1e12:.1f}'} "
            f"| {r['compile_s']} |"
        )
    return "\n".join(out)


# %%
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="the 8-CPU-device layout table instead of the TPU cases")
    parser.add_argument("--case", action="append", help="run only these TPU cases (by name)")
    parser.add_argument("--quick", action="store_true", help="a tiny model on v5e:2x2 (to a temporary file)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--redo", action="store_true", help="recompile cases already in the JSON")
    args = parser.parse_args()
    default = os.path.join(RESULTS, "aot_pod_cpu.json" if args.cpu else "aot_pod.json")
    path = args.json or (os.path.join(tempfile.mkdtemp(), "aot_pod.json") if args.quick else default)
    payload = {"experiment": "aot_pod", "tpu_rows": [], "cpu_rows": []}
    if os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)
    payload.update(jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                   note="deviceless AOT compile with libtpu on a CPU host (AMD EPYC, 2 cores shared with other jobs); "
                        "nothing ran on a TPU. Memory and FLOPs are the compiler's; compile times are under load; "
                        "the 6ND column is an analytical estimate. *XLA's cost_analysis counts a while loop's body "
                        "once (scan_layers: one block of n_layer - 1) and the Pallas kernels' custom calls as 0 FLOPs: "
                        "it is a lower bound on the step's FLOPs, not the step's FLOPs.")
    if args.cpu:
        payload["cpu_rows"] = run_cpu_layouts()
        payload["cpu_table"] = table(payload["cpu_rows"])
    else:
        quick = [("tiny fsdp4 b8 l512 scan+remat", "tiny", SCAN_REMAT, "v5e:2x2", dict(fsdp=4), 8, 512)]
        cases = quick if args.quick else TPU_CASES
        cases = [c for c in cases if not args.case or c[0] in args.case]
        done = {r["case"] for r in payload["tpu_rows"]}
        for case in cases:
            if case[0] in done and not args.redo:
                print(f"{case[0]}: already in {path}", flush=True)
                continue
            row = run_tpu_case(*case)
            print(json.dumps(row), flush=True)
            payload["tpu_rows"] = [r for r in payload["tpu_rows"] if r["case"] != case[0]] + [row]
            payload["tpu_table"] = table(payload["tpu_rows"])
            with open(path, "w") as f:  # after every case: a killed run resumes
                json.dump(payload, f, indent=1)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(payload.get("cpu_table" if args.cpu else "tpu_table", ""))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
