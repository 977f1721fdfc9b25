"""The GPU (Pallas Triton) SSD kernel: interpret mode on CPU against the float64
oracle and the reference's gradients, and lowering for cuda.

The numerical tests go through ``pallas_kernels.ssd.ops.ssd_pallas(platform="gpu")``
(padding, document numbers, D broadcast); the error and lowering tests call
``ssd_gpu`` on the padded layout directly. On a GPU machine the kernel runs for
real (not interpreted).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import lowering
from conftest import TOL, rel_err
from ssd_oracle import ssd_oracle
from test_ssd import documents, make_ssd_inputs

import mamba_jax as mj
from pallas_kernels.ssd.config import SsdKernelConfig
from pallas_kernels.ssd.gpu import ssd_gpu
from pallas_kernels.ssd.gpu_blocks import gpu_extra_bytes, gpu_tiles
from pallas_kernels.ssd.ops import ssd_pallas

ON_GPU = jax.default_backend() == "gpu"
KERNEL_TOL = {"float32": 1e-4, "bfloat16": 2e-2}  # against the float64 oracle (DESIGN.md: kernels)
# Gradients against autodiff of impl="reference" on the same inputs: float32
# agree to float32 rounding; bf16 operands of the in-kernel matmuls (as the
# reference's Triton kernels use them) round at bf16's 2^-9.
GRAD_TOL = {"float32": 1e-4, "bfloat16": 1e-2}
# dA and dt_bias are sums over every (b, l) step of terms of both signs: their
# relative error is the bf16 rounding amplified by that cancellation.
SUMMED_GRAD_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
NO_LIMIT = (0.0, float("inf"))


def _gpu_call(args, *, chunk, softplus, dt_limit=NO_LIMIT, seq_idx=None):
    """The GPU kernel through ssd_pallas (padding, document numbers, D broadcast); (y, final_state)."""
    return ssd_pallas(**args, dt_softplus=softplus, dt_limit=dt_limit, seq_idx=seq_idx, platform="gpu",
                      chunk_size=chunk, interpret=not ON_GPU)


def _fwd_and_grads(fn, args, cot_y, cot_h):
    """(y, final_state, gradients of sum(y cot_y) + sum(final_state cot_h) for every input), one jit."""
    names = list(args)

    def loss(*values):
        y, h = fn(dict(zip(names, values)))
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h), (y, h)

    grads, (y, h) = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))(*args.values())
    return y, h, dict(zip(names, grads))


# name: (b, l, h, p, g, n, chunk, document lengths per row or None, options of make_ssd_inputs)
# Chunk 16 is one in-chunk tile; chunk 128 has two tiles of 64 (rows and columns
# cross tiles). Lengths 1, primes, below / at / above the chunk; documents of
# length 1 at the start, middle and end and across chunk edges.
CASES = {
    "l37_groups3_Dchannel_docs": (2, 37, 6, 4, 3, 5, 16, [[1, 9, 1, 1, 15, 7, 3], [16, 1, 19, 1]],
                                  dict(D="channel")),
    "l1_groups2_limit": (2, 1, 4, 3, 2, 5, 16, None, dict(dt_limit=(0.05, 0.3))),
    "l16_plain": (2, 16, 2, 4, 1, 3, 16, None, dict(D=None, z=False, bias=False, h0=False, softplus=False)),
    "l151_chunk128_docs": (1, 151, 2, 16, 1, 16, 128, [[64, 1, 63, 1, 22]], dict()),
}
SLOW_CASES = {
    "l13_groups4_limit": (1, 13, 8, 2, 4, 3, 16, None, dict(D="channel", dt_limit=(0.05, 0.3))),
    "l67_chunk32_docs_h0": (2, 67, 4, 8, 2, 8, 32, [[31, 1, 1, 34], [67]], dict(D="channel")),
    "l300_chunk128_groups2": (1, 300, 4, 16, 2, 32, 128, None, dict(dt_limit=(0.01, 0.5))),
}
ALL_CASES = {**CASES, **SLOW_CASES}


def _case(name, dtype):
    b, l, h, p, g, n, chunk, docs, opts = ALL_CASES[name]
    opts = dict(opts)
    kw = dict(chunk=chunk, softplus=opts.get("softplus", True), dt_limit=opts.pop("dt_limit", NO_LIMIT))
    args = make_ssd_inputs(list(ALL_CASES).index(name) + 50, b, l, h, p, g, n, dtype=dtype, **opts)
    seq_idx = None if docs is None else documents(docs) * 7 + 3  # ids need not be 0, 1, 2, ...
    return args, kw, seq_idx


def _check_case(name, dtype):
    args, kw, seq_idx = _case(name, jnp.dtype(dtype))
    b, l, h, p = args["x"].shape
    n = args["B"].shape[-1]
    if "initial_state" not in args:  # the final state's cotangent reaches h0 too
        args["initial_state"] = jnp.asarray(np.random.default_rng(7).standard_normal((b, h, p, n)), jnp.float32)
    rng = np.random.default_rng(99)
    cot_y = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
    cot_h = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)

    y, hT, grads = _fwd_and_grads(lambda a: _gpu_call(a, **kw, seq_idx=seq_idx), args, cot_y, cot_h)
    y_ref, h_ref = ssd_oracle(**args, dt_softplus=kw["softplus"], dt_limit=kw["dt_limit"], seq_idx=seq_idx)
    assert y.dtype == args["x"].dtype and hT.dtype == jnp.float32
    errs = {"y": rel_err(y, y_ref), "final_state": rel_err(hT, h_ref)}
    # bf16: the chunk-state matmuls take bf16 operands (dt-weighted x rounded to
    # bf16, as the reference's Triton kernel does), so the state too is at bf16 rounding.
    assert errs["y"] < KERNEL_TOL[dtype] and errs["final_state"] < KERNEL_TOL[dtype], errs

    def reference(a):
        return mj.ops.ssd(**a, chunk_size=kw["chunk"], dt_softplus=kw["softplus"], dt_limit=kw["dt_limit"],
                          seq_idx=seq_idx, return_final_state=True, impl="reference")

    _, _, ref = _fwd_and_grads(reference, args, cot_y, cot_h)
    assert set(grads) == set(args) >= {"x", "dt", "A", "B", "C", "initial_state"}
    for key in ref:
        assert grads[key].dtype == args[key].dtype and grads[key].shape == args[key].shape, key
        errs["d" + key] = rel_err(grads[key], ref[key])
    print(name, dtype, {k: f"{v:.1e}" for k, v in errs.items()})  # the report's error table (pytest -s)
    tol = lambda k: (SUMMED_GRAD_TOL if k in ("dA", "ddt_bias") else GRAD_TOL)[dtype]
    bad = {k: v for k, v in errs.items() if k.startswith("d") and not v < tol(k)}
    assert not bad, bad


@pytest.mark.parametrize("case", list(CASES) + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CASES])
def test_float32_forward_and_gradients(case):
    _check_case(case, "float32")


@pytest.mark.parametrize(
    "case",
    ["l37_groups3_Dchannel_docs"] + [pytest.param(c, marks=pytest.mark.slow) for c in ("l151_chunk128_docs", "l1_groups2_limit")],
)
def test_bfloat16_forward_and_gradients(case):
    _check_case(case, "bfloat16")


def test_errors_name_the_problem():
    args = make_ssd_inputs(1, 1, 16, 2, 4, 1, 4)
    x, dt, A, B, C = (args[k] for k in ("x", "dt", "A", "B", "C"))
    cfg = SsdKernelConfig(length=16, chunk=16, softplus=True, dt_limit=NO_LIMIT, interpret=True)
    with pytest.raises(ValueError, match="power of two >= 16"):
        ssd_gpu(cfg._replace(chunk=8), x, dt, A, B, C, None, None, None, None, None)
    with pytest.raises(ValueError, match="multiple of cfg.chunk=32"):
        ssd_gpu(cfg._replace(chunk=32), x, dt, A, B, C, None, None, None, None, None)
    with pytest.raises(ValueError, match=r"D must have shape \(2, 4\)"):
        ssd_gpu(cfg, x, dt, A, B, C, A, None, None, None, None)
    with pytest.raises(TypeError, match="doc must be int32"):
        ssd_gpu(cfg, x, dt, A, B, C, None, None, None, None, jnp.zeros((1, 16), jnp.float32))
    with pytest.raises(TypeError, match="interpret=True or False"):
        ssd_gpu(cfg._replace(interpret="yes"), x, dt, A, B, C, None, None, None, None, None)


def test_memory_arithmetic():
    t = gpu_tiles(256, 64, 128)
    assert (t.block_t, t.P, t.N) == (32, 64, 128)
    assert gpu_tiles(16, 3, 5)[2:4] == (16, 16)  # padded for tl.dot
    assert gpu_tiles(256, 64, 128, itemsize=4).block_t == 16  # float32: smaller tiles (registers)
    extra = gpu_extra_bytes(1, 2048, 24, 64, 128, 256)
    assert extra["residual_states"] == 4 * 8 * 24 * 64 * 128  # chunk-entering states only: 6 MiB


# --------------------------------------------------------------------------
# Lowering for cuda at a Mamba-2 shape (24 heads x 64, n 128, chunk 256, bf16)
# --------------------------------------------------------------------------

TRITON = lowering.CUSTOM_CALLS["triton"]


def _mamba2_shapes(b=1, L=2048, h=24, p=64, g=1, n=128, bf=jnp.bfloat16):
    S, f32 = jax.ShapeDtypeStruct, jnp.float32
    return (S((b, L, h, p), bf), S((b, L, h), bf), S((h,), f32), S((b, L, g, n), bf), S((b, L, g, n), bf),
            S((h, p), f32), S((b, L, h, p), bf), S((h,), f32), S((b, h, p, n), f32), S((b, L), jnp.int32))


@pytest.mark.parametrize("length,dtype", [(2048, "bfloat16"), (2043, "float32")])
def test_lowers_for_cuda_forward_and_gradient(length, dtype):
    """The forward is 3 Triton calls (chunk states, state passing, chunk outputs); the
    gradient 6 (chunk states, state passing; state cotangents, reverse passing, rows,
    columns: the forward's output call is dead code under grad). float32 inputs
    lower their matmuls as three TF32 passes."""
    cfg = SsdKernelConfig(length=length, chunk=256, softplus=True, dt_limit=NO_LIMIT, interpret=False)

    def loss(*a):
        y, hT = ssd_gpu(cfg, *a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(hT)

    shapes = _mamba2_shapes(bf=jnp.dtype(dtype))
    fwd = lowering.export_for("cuda", lambda *a: ssd_gpu(cfg, *a), *shapes)
    grad = lowering.export_for("cuda", jax.grad(loss, argnums=tuple(range(9))), *shapes)
    assert lowering.custom_call_targets(fwd)[TRITON] == 3
    assert lowering.custom_call_targets(grad)[TRITON] == 6
    assert [a.shape for a in fwd.out_avals] == [(1, 2048, 24, 64), (1, 24, 64, 128)]
    assert fwd.out_avals[0].dtype == jnp.dtype(dtype)


def test_auto_never_embeds_the_gpu_kernel():
    """It has never run on a GPU: impl="auto" for cuda is the chunked XLA scan, no Triton call."""
    S = jax.ShapeDtypeStruct
    shapes = (S((1, 512, 4, 64), jnp.bfloat16), S((1, 512, 4), jnp.bfloat16), S((4,), jnp.float32),
              S((1, 512, 1, 128), jnp.bfloat16), S((1, 512, 1, 128), jnp.bfloat16))
    exp = lowering.export_for("cuda", lambda *a: mj.ops.ssd(*a, dt_softplus=True, impl="auto"), *shapes)
    assert lowering.custom_call_targets(exp)[TRITON] == 0


@pytest.mark.skipif(ON_GPU, reason="the message is for machines without a GPU")
def test_gpu_benchmark_refuses_without_a_gpu(tmp_path):
    """experiments/bench_ssd_gpu.py measures nothing and writes nothing without a GPU."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "experiments" / "bench_ssd_gpu.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0 and "bench_ssd_gpu needs a GPU" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())
