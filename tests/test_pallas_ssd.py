"""The TPU (Mosaic) SSD kernel in interpret mode against the float64 oracle and impl="reference".

The kernel runs on CPU in interpret mode (``interpret=True``, and one case
under ``pltpu.InterpretParams``, which simulates TPU memory semantics): the
forward against ``tests/ssd_oracle.py`` (float64, from the equations), and the
gradient of every input (x, dt, A, B, C, D per head and per channel, z,
dt_bias, initial_state) for random cotangents of y and of the final state
against autodiff of ``impl="reference"`` on the same inputs. Lengths 1,
primes, below, at and above the chunk; several groups; packed documents with
documents of length 1; dt_limit and softplus; float32 and bfloat16. The
shapes are tiny (interpret mode compiles the whole kernel body on CPU);
compilation for real TPUs is tests/test_tpu_compile.py's business.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax.experimental.pallas import tpu as pltpu
from ssd_oracle import ssd_oracle
from test_ssd import documents, make_ssd_inputs

import lowering
import mamba_jax as mj
from mamba_jax.ops.ssd import VERIFIED_SSD
from pallas_kernels.ssd import ssd_pallas

# Kernel vs the float64 oracle (forward) and vs autodiff of the reference on the
# same inputs (gradients), per input dtype. bfloat16: the kernel and the
# reference both compute in float32 and round their bf16 outputs/cotangents.
FWD_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
GRAD_TOL = {"float32": 1e-4, "bfloat16": 5e-3}

# name: (seed, b, l, h, p, g, n, chunk, dtype, input options, ssd options, document lengths per row or None)
CASES = {
    # Three chunks (37 = 16 + 16 + 5), two groups, every option, documents of length 1 on both sides of a chunk edge.
    "l37_f32_all_docs": (1, 2, 37, 4, 8, 2, 16, 16, "float32", dict(D="channel"),
                         dict(dt_softplus=True), [[3, 1, 12, 1, 1, 19], [16, 1, 20]]),
    # At the chunk, clamped dt (both ends of the limit bind), D per head, no gate, no bias.
    "l16_bf16_limit": (2, 1, 16, 4, 8, 1, 8, 16, "bfloat16", dict(z=False, bias=False),
                       dict(dt_softplus=True, dt_limit=(0.08, 0.2)), None),
    # One step, nothing optional, dt used as given (no softplus).
    "l1_plain": (3, 2, 1, 2, 8, 1, 8, 16, "float32", dict(D=None, z=False, bias=False, h0=False, softplus=False),
                 dict(), None),
}
SLOW_CASES = {
    # The model layout: p = 64, n = 64, a chunk of 128 (the TPU's lane width), unaligned length over 3 chunks.
    "l300_p64_n64_bf16": (4, 1, 300, 2, 64, 1, 64, 128, "bfloat16", dict(), dict(dt_softplus=True), None),
    # Below the chunk (one chunk of 11 -> 16 steps), four groups of one head, documents of length 1.
    "l11_groups4_docs": (5, 2, 11, 4, 8, 4, 16, 16, "float32", dict(), dict(dt_softplus=True),
                         [[1, 1, 9], [5, 1, 1, 4]]),
    # A prime length over 5 chunks in bfloat16 with documents, per-channel D, clamp.
    "l67_bf16_docs_limit": (6, 1, 67, 4, 8, 2, 16, 16, "bfloat16", dict(D="channel"),
                            dict(dt_softplus=True, dt_limit=(0.05, 0.3)), [[1, 30, 1, 1, 34]]),
}
ORDER = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def _setup(case):
    seed, b, l, h, p, g, n, chunk, dtype, opts, kw, docs = case
    args = make_ssd_inputs(seed, b, l, h, p, g, n, dtype=jnp.dtype(dtype), **opts)
    seq_idx = None if docs is None else documents(docs)
    return args, kw, chunk, seq_idx


def _kernel(names, kw, chunk, seq_idx, interpret=True):
    def f(*values):
        a = dict(zip(names, values))
        return ssd_pallas(
            a["x"], a["dt"], a["A"], a["B"], a["C"], a.get("D"), a.get("z"), a.get("dt_bias"),
            kw.get("dt_softplus", False), kw.get("dt_limit", (0.0, float("inf"))), a.get("initial_state"), seq_idx,
            platform="tpu", chunk_size=chunk, interpret=interpret,
        )

    return f


def _reference(names, kw, chunk, seq_idx):
    def f(*values):
        return mj.ops.ssd(**dict(zip(names, values)), **kw, chunk_size=chunk, seq_idx=seq_idx,
                          return_final_state=True, impl="reference")

    return f


def _value_and_grads(fn, values, cot_y, cot_h):
    def loss(*v):
        y, h = fn(*v)
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h)

    out = jax.jit(fn)(*values)
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(values)))))(*values)
    return out, grads


def _check(case):
    args, kw, chunk, seq_idx = _setup(case)
    dtype = case[8]
    names = [k for k in ORDER if k in args]
    values = [args[k] for k in names]
    b, l, h, p = args["x"].shape
    rng = np.random.default_rng(100 + case[0])
    cot_y = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
    cot_h = jnp.asarray(rng.standard_normal((b, h, p, args["B"].shape[-1])), jnp.float32)
    (y, hT), grads = _value_and_grads(_kernel(names, kw, chunk, seq_idx), values, cot_y, cot_h)
    assert y.dtype == args["x"].dtype and hT.dtype == jnp.float32
    y_or, h_or = ssd_oracle(**args, **kw, seq_idx=seq_idx)
    errors = {"y": rel_err(jnp.asarray(y, jnp.float32), y_or), "final_state": rel_err(hT, h_or)}
    assert errors["y"] < FWD_TOL[dtype], errors
    assert errors["final_state"] < FWD_TOL["float32"], errors  # the state is float32 whatever the input
    _, ref_grads = _value_and_grads(_reference(names, kw, chunk, seq_idx), values, cot_y, cot_h)
    for name, g, r in zip(names, grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
        errors["d" + name] = rel_err(jnp.asarray(g, jnp.float32), jnp.asarray(r, jnp.float32))
    print(errors)  # the oracle error table of the report comes from these lines (pytest -s)
    bad = {k: v for k, v in errors.items() if k.startswith("d") and v >= GRAD_TOL[dtype]}
    assert not bad, (bad, errors)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_forward_and_gradients(name):
    _check(CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_kernel_forward_and_gradients_slow(name):
    _check(SLOW_CASES[name])


def test_interpret_params_forward():
    """Under pltpu.InterpretParams (TPU memory semantics simulated: buffers, DMAs,
    races) the forward matches the oracle, across chunks and documents."""
    args = make_ssd_inputs(7, 1, 21, 2, 8, 2, 8, D="channel")
    seq_idx = documents([[9, 1, 11]])
    names = [k for k in ORDER if k in args]
    fn = _kernel(names, dict(dt_softplus=True), 8, seq_idx, interpret=pltpu.InterpretParams())
    y, hT = fn(*[args[k] for k in names])
    y_or, h_or = ssd_oracle(**args, dt_softplus=True, seq_idx=seq_idx)
    assert rel_err(y, y_or) < FWD_TOL["float32"] and rel_err(hT, h_or) < FWD_TOL["float32"]


def test_dispatch_explicit_pallas_runs_the_kernel_on_cpu():
    """ssd(impl="pallas") on CPU runs the TPU kernel interpreted (eager: only the CPU branch runs),
    below one chunk (a single chunk of l rounded up to 8) with several groups and a per-head D."""
    args = make_ssd_inputs(8, 2, 11, 4, 8, 4, 16, dtype=jnp.bfloat16)
    y, hT = mj.ops.ssd(**args, chunk_size=256, dt_softplus=True, return_final_state=True, impl="pallas")
    y_or, h_or = ssd_oracle(**args, dt_softplus=True)
    assert rel_err(jnp.asarray(y, jnp.float32), y_or) < FWD_TOL["bfloat16"]
    assert rel_err(hT, h_or) < FWD_TOL["float32"]


def test_auto_policy_on_tpu():
    """auto picks the kernel on TPU only at the verified shapes; nowhere else."""
    verified = VERIFIED_SSD["tpu"]
    resolve = mj.ops.resolve_ssd_impl
    for n in range(1, 257):
        want = "pallas" if n in verified["state_sizes"] else "chunked"
        assert resolve("tpu", n, 4096, headdim=64, chunk_size=256) == want
    assert resolve("tpu", 128, 1, headdim=64, chunk_size=256) == "chunked"  # a decode step
    assert resolve("tpu", 128, 2048, headdim=32, chunk_size=256) == "chunked"
    assert resolve("tpu", 128, 2048, headdim=64, chunk_size=64) == "chunked"
    for backend in ("cpu", "cuda", "gpu", "rocm"):  # no GPU kernel was run on a GPU: never auto
        assert resolve(backend, 128, 4096, headdim=64, chunk_size=256) == "chunked"


def test_auto_embeds_the_kernel_for_tpu_only():
    """Exported for tpu, cuda and cpu, ssd(impl="auto") with its backward at a verified
    shape holds the Mosaic kernel (forward and backward) and no GPU kernel."""
    args = make_ssd_inputs(9, 1, 300, 2, 64, 1, 64, dtype=jnp.bfloat16)

    def loss(a, s):
        y, h = mj.ops.ssd(**a, seq_idx=s, dt_softplus=True, return_final_state=True)  # chunk 256, auto
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    seq_idx = documents([[100, 1, 199]])
    exp = lowering.export_for("tpu", jax.value_and_grad(loss), args, seq_idx)
    text = exp.mlir_module()
    assert text.count(lowering.CUSTOM_CALLS["tpu"]) == 2, lowering.custom_call_targets(exp)
    assert "ssd_fwd_tpu" in text and "ssd_bwd_tpu" in text
    exp = lowering.export_for("cuda", jax.value_and_grad(loss), args, seq_idx)
    assert lowering.CUSTOM_CALLS["tpu"] not in exp.mlir_module()
    assert lowering.CUSTOM_CALLS["triton"] not in exp.mlir_module()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chunk_size=64), "chunk_size=64 must be a multiple of 128"),
        (dict(platform="cpu"), "platform='cpu' must be one of"),
        (dict(dt_limit=(1.0, 0.5)), "lo <= hi"),
        (dict(chunk_size=2048), "VMEM"),
    ],
)
def test_bad_configuration_raises_before_lowering(kwargs, match):
    args = make_ssd_inputs(10, 1, 2100, 2, 64, 1, 128, dtype=jnp.bfloat16)
    kw = dict(platform="tpu", chunk_size=256) | kwargs
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda a: ssd_pallas(**a, **kw), args)


def test_explicit_pallas_in_jit_checks_the_tpu_branch():
    """Under jit every platform's branch is traced: a chunk the TPU kernel cannot take
    fails at trace time with the kernel's message, never at lowering or run time."""
    args = make_ssd_inputs(11, 1, 300, 2, 64, 1, 64)
    with pytest.raises(ValueError, match="multiple of 128"):
        jax.jit(lambda a: mj.ops.ssd(**a, chunk_size=64, impl="pallas")).lower(args)


@pytest.mark.parametrize(
    "override,exc,match",
    [
        (dict(A=jnp.ones((3,), jnp.float32)), ValueError, "A must have shape"),
        (dict(B=jnp.ones((1, 20, 3, 4), jnp.float32)), ValueError, "g dividing h"),
        (dict(D=jnp.ones((2, 3), jnp.float32)), ValueError, "D must have shape"),
        (dict(seq_idx=jnp.ones((1, 20), jnp.float32)), TypeError, "seq_idx must be an integer"),
        (dict(x=jnp.ones((1, 20, 2, 8), jnp.int32)), TypeError, "x must have a floating dtype"),
    ],
)
def test_bad_inputs_raise(override, exc, match):
    args = make_ssd_inputs(12, 1, 20, 2, 8, 1, 4) | override
    with pytest.raises(exc, match=match):
        ssd_pallas(**args, platform="tpu", chunk_size=16, interpret=True)
