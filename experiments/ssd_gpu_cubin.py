# %% [markdown]
# # The GPU SSD kernels compiled to cubin without a GPU: registers, spills, shared memory
#
# `jax.export` for cuda embeds each Pallas Triton kernel as Triton IR (TTIR) in
# a `__gpu$xla.gpu.triton` custom call; it does not run Triton's compiler.
# This script takes that IR out of the exported forward and gradient of
# `pallas_kernels.ssd.gpu.ssd_gpu`, prints it as text with jaxlib's MLIR, and
# compiles it for sm80 (A100) and sm90 (H100) with a separate Python that has
# the `triton` wheel (its compiler and the ptxas it ships), with the
# num_warps / num_stages of each custom call. `cuobjdump --dump-resource-usage`
# then gives registers per thread, stack (register spills) and static shared
# memory; Triton's metadata gives the dynamic shared memory.
#
# It does not run anything on a GPU and does not use the Triton version XLA
# links (a pip wheel's, maybe a different release): it answers "does it
# compile, does it spill, does it fit", not "how fast".
#
#     python -m venv /tmp/tt && /tmp/tt/bin/pip install triton
#     python experiments/ssd_gpu_cubin.py --triton-python /tmp/tt/bin/python --out experiments/results

# %%
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import lowering  # noqa: E402  (tests/lowering.py: export for cuda from a CPU host)
from pallas_kernels.ssd.config import SsdKernelConfig  # noqa: E402
from pallas_kernels.ssd.gpu import ssd_gpu  # noqa: E402

# Hyperparameters --------------------------------------------------------------
CONFIGS = {  # name: (p, n, chunk, dtype); h, b, L do not change a kernel's code
    "p64_n128_bf16": (64, 128, 256, jnp.bfloat16),
    "p64_n64_bf16": (64, 64, 256, jnp.bfloat16),
    "p64_n128_f32": (64, 128, 256, jnp.float32),
}
ARCHS = (80, 90)
H, B, L = 8, 1, 1024

# Runs under --triton-python: argv = ttir path, sm, num_warps, num_stages; prints one JSON line.
COMPILE = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
path, cc, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
k = triton.compile(path, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=warps, num_stages=stages))
with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(k.asm["cubin"])
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
line = next(l for l in out.splitlines() if "REG:" in l)
usage = dict(item.split(":", 1) for item in line.split() if ":" in item)
print(json.dumps(dict(triton=triton.__version__, regs=int(usage["REG"]), stack_bytes=int(usage["STACK"]),
                      local_bytes=int(usage["LOCAL"]), dynamic_shared_bytes=int(k.metadata.shared))))
"""


# %%
def kernels_of(p, n, chunk, dtype):
    """{(kernel name, ir hash): (ttir text, num_warps, num_stages)} of the exported forward and gradient."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib import triton as tt_lib
    from jax._src.lib.mlir import ir

    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    shapes = (S((B, L, H, p), dtype), S((B, L, H), dtype), S((H,), f32), S((B, L, 1, n), dtype),
              S((B, L, 1, n), dtype), S((H, p), f32), S((B, L, H, p), dtype), S((H,), f32),
              S((B, H, p, n), f32), S((B, L), jnp.int32))
    cfg = SsdKernelConfig(length=L - 3, chunk=chunk, softplus=True, dt_limit=(0.0, float("inf")), interpret=False)

    def loss(*a):
        y, hT = ssd_gpu(cfg, *a)
        return jnp.sum(y.astype(f32)) + jnp.sum(hT)

    found = {}
    for fn in (lambda *a: ssd_gpu(cfg, *a), jax.grad(loss, argnums=tuple(range(9)))):
        text = lowering.export_for("cuda", fn, *shapes).mlir_module()
        with jmlir.make_ir_context() as ctx:
            tt_lib.dialect.register_dialect(ctx)
            module = ir.Module.parse(text)  # keep it alive while its operations are walked
            ops = [module.operation]
            while ops:
                op = ops.pop()
                for region in op.regions:
                    for block in region.blocks:
                        ops.extend(o.operation for o in block.operations)
                if op.name != "stablehlo.custom_call" or "mhlo.backend_config" not in op.attributes:
                    continue
                conf = ir.DictAttr(op.attributes["mhlo.backend_config"])
                name = ir.StringAttr(conf["name"]).value
                kernel = ir.Module.parse(ir.StringAttr(conf["ir"]).value_bytes)
                ttir = kernel.operation.get_asm(enable_debug_info=False)
                key = (name, hashlib.sha1(ttir.encode()).hexdigest()[:8])
                found[key] = (ttir, ir.IntegerAttr(conf["num_warps"]).value, ir.IntegerAttr(conf["num_stages"]).value)
    return found


def compile_one(triton_python, ttir, cc, warps, stages):
    with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as f:
        f.write(ttir)
    proc = subprocess.run([triton_python, "-c", COMPILE, f.name, str(cc), str(warps), str(stages)],
                          capture_output=True, text=True)
    if proc.returncode:
        return dict(error=(proc.stderr or proc.stdout)[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--triton-python", required=True, help="a Python interpreter with the triton wheel")
    parser.add_argument("--out", required=True, help="directory for ssd_gpu_cubin.json")
    args = parser.parse_args()
    rows = []
    for cname, (p, n, chunk, dtype) in CONFIGS.items():
        for (kname, digest), (ttir, warps, stages) in sorted(kernels_of(p, n, chunk, dtype).items()):
            for cc in ARCHS:
                row = dict(config=cname, kernel=kname, ir=digest, sm=cc, num_warps=warps, num_stages=stages,
                           **compile_one(args.triton_python, ttir, cc, warps, stages))
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ssd_gpu_cubin.json"
    payload = dict(experiment="ssd_gpu_cubin", jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                   note="compiled from the exported TTIR with the triton wheel; nothing ran on a GPU", rows=rows)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    if any("error" in r for r in rows):
        sys.exit("some kernels failed to compile (see the JSON)")


if __name__ == "__main__":
    main()
