"""The XLA selective-scan implementations against a float64 oracle and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GRAD_TOL, TOL, rel_err, selective_scan_oracle
from scan_inputs import make_scan_inputs

import mamba_jax as mj
from pallas_kernels.selective_scan import cpu as cpu_scan

XLA_IMPLS = ["reference", "sequential", "chunked"]  # "step" (l = 1) is tested on its own

# (b, l, d, n, g, options): lengths around the chunk size 16 used below (1, primes, < T, = T, > T).
CASES = {
    "l1": (2, 1, 6, 4, None, dict(D=False, z=False, bias=False, h0=False)),
    "l7_groups_noh0": (1, 7, 8, 3, 2, dict(h0=False)),
    "l16_plain": (2, 16, 6, 5, None, dict(D=False, z=False, bias=False, h0=False, softplus=False)),
    "l37_all": (2, 37, 12, 5, 3, dict()),
    "l67_ungrouped": (1, 67, 10, 4, None, dict(bias=False)),
}


def _run(impl, args, softplus=True, **kw):
    if impl in ("sequential", "chunked"):
        kw.setdefault("chunk_size", 16)
    return mj.ops.selective_scan(**args, delta_softplus=softplus, return_final_state=True, impl=impl, **kw)


@pytest.mark.parametrize("impl", XLA_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64_oracle(impl, case):
    b, l, d, n, g, opts = CASES[case]
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    args = make_scan_inputs(list(CASES).index(case), b, l, d, n, g, **opts)
    y, h = _run(impl, args, softplus)
    y_ref, h_ref = selective_scan_oracle(**args, delta_softplus=softplus)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL["float32"]
    assert rel_err(h, h_ref) < TOL["float32"]


@pytest.mark.parametrize("impl", XLA_IMPLS)
def test_bfloat16_inputs(impl):
    args = make_scan_inputs(11, 2, 37, 12, 5, 3, dtype=jnp.bfloat16)
    y, h = _run(impl, args)
    y_ref, h_ref = selective_scan_oracle(**args, delta_softplus=True)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL["bfloat16"]
    # The state is float32 arithmetic on bf16-rounded inputs: as exact as float32.
    assert rel_err(h, h_ref) < TOL["float32"]


def test_default_chunk_size_and_auto():
    args = make_scan_inputs(3, 1, 150, 8, 4)
    y_ref, h_ref = selective_scan_oracle(**args, delta_softplus=True)
    for impl in ("chunked", "auto"):
        y, h = mj.ops.selective_scan(**args, delta_softplus=True, return_final_state=True, impl=impl)
        assert rel_err(y, y_ref) < TOL["float32"] and rel_err(h, h_ref) < TOL["float32"]
    # the native CPU kernel where a C++ compiler can build it (tests/test_cpu_scan.py)
    expected = "sequential" if cpu_scan.unavailable_reason() else "cpu"
    assert mj.ops.resolve_impl("cpu", 16) == expected


def _grads(impl, args, cot_y, cot_h):
    names = list(args)

    def loss(*values):
        y, h = _run(impl, dict(zip(names, values)))
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h)

    return dict(zip(names, jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*args.values())))


@pytest.mark.parametrize("impl", ["sequential", "chunked"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 37, 12, 5, 3), (1, 16, 6, 4, None)])
def test_gradients_match_reference(impl, dtype, shape):
    b, l, d, n, g = shape
    args = make_scan_inputs(5, b, l, d, n, g, dtype=jnp.dtype(dtype))
    kc = jax.random.split(jax.random.key(99))
    cot_y = jax.random.normal(kc[0], (b, l, d), jnp.float32)
    cot_h = jax.random.normal(kc[1], (b, d, n), jnp.float32)
    ref = _grads("reference", args, cot_y, cot_h)
    out = _grads(impl, args, cot_y, cot_h)
    assert set(out) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"}
    for name in ref:
        assert out[name].dtype == args[name].dtype, name
        assert rel_err(out[name], ref[name]) < GRAD_TOL["float32"] * (1 if dtype == "float32" else 100), name


def test_gradients_against_finite_differences():
    """The reference gradient (autodiff through the associative scan, float32)
    against central differences of the float64 oracle along a random direction
    of every input at once."""
    args = make_scan_inputs(8, 1, 5, 4, 3, 2)
    names = list(args)
    rng = np.random.default_rng(0)
    dirs = {k: rng.standard_normal(np.shape(v)) for k, v in args.items()}
    w = rng.standard_normal(args["u"].shape)

    def f64(values):  # float64 end to end: central differences are exact to ~1e-9 here
        y, h = selective_scan_oracle(**values, delta_softplus=True, as_float64=True)
        return float(np.sum(y * w) + np.sum(h))

    eps = 1e-5
    plus = {k: np.asarray(v, np.float64) + eps * dirs[k] for k, v in args.items()}
    minus = {k: np.asarray(v, np.float64) - eps * dirs[k] for k, v in args.items()}
    fd = (f64(plus) - f64(minus)) / (2 * eps)

    def loss(*values):
        y, h = _run("reference", dict(zip(names, values)))
        return jnp.sum(y * jnp.asarray(w, jnp.float32)) + jnp.sum(h)

    grads = jax.grad(loss, argnums=tuple(range(len(names))))(*args.values())
    directional = sum(float(np.vdot(np.asarray(g, np.float64), dirs[k])) for k, g in zip(names, grads))
    assert abs(directional - fd) < 1e-5 * abs(fd), (directional, fd)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("g", [None, 2])
def test_one_step_matches_oracle(dtype, g):
    """impl="step" and selective_state_update (the decode path): forward against
    the float64 oracle, gradients of every input against the reference impl."""
    args = make_scan_inputs(21, 2, 1, 8, 5, g, dtype=jnp.dtype(dtype))
    y, h = _run("step", args)
    y_ref, h_ref = selective_scan_oracle(**args, delta_softplus=True)
    assert y.dtype == args["u"].dtype and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL[dtype] and rel_err(h, h_ref) < TOL["float32"]
    squeeze = {k: (v[:, 0] if k in ("u", "delta", "z", "B", "C") else v) for k, v in args.items()}
    state = squeeze.pop("initial_state")
    y1, h1 = mj.ops.selective_state_update(state, **squeeze, delta_softplus=True)
    assert y1.shape == (2, 8) and rel_err(y1, y[:, 0]) == 0.0 and rel_err(h1, h) == 0.0
    kc = jax.random.split(jax.random.key(3))
    cot_y = jax.random.normal(kc[0], (2, 1, 8), jnp.float32)
    cot_h = jax.random.normal(kc[1], (2, 8, 5), jnp.float32)
    ref, out = _grads("reference", args, cot_y, cot_h), _grads("step", args, cot_y, cot_h)
    for name in ref:
        assert out[name].dtype == args[name].dtype, name
        assert rel_err(out[name], ref[name]) < GRAD_TOL[dtype], name


def test_auto_below_one_kernel_block_is_the_plain_recurrence():
    """On every platform, l = 1 resolves to "step" and l < block_l to "sequential"."""
    for backend in ("cpu", "tpu", "cuda"):
        assert mj.ops.resolve_impl(backend, 16, 1) == "step"
        assert mj.ops.resolve_impl(backend, 16, 2) == "sequential"
    args = make_scan_inputs(4, 1, 1, 6, 4)
    y, h = mj.ops.selective_scan(**args, delta_softplus=True, return_final_state=True)
    y_ref, h_ref = selective_scan_oracle(**args, delta_softplus=True)
    assert rel_err(y, y_ref) < TOL["float32"] and rel_err(h, h_ref) < TOL["float32"]
    with pytest.raises(ValueError, match="impl='step' runs one time step"):
        mj.ops.selective_scan(**make_scan_inputs(4, 1, 3, 6, 4), impl="step")


def test_chunked_training_memory_is_per_chunk():
    """The chunked backward keeps boundary states only, not all (b, l, d, n) states."""
    b, l, d, n = 1, 2048, 64, 16
    args = make_scan_inputs(0, b, l, d, n, D=False, z=False, bias=False, h0=False)
    all_states_bytes = b * l * d * n * 4

    def temp_bytes(impl):
        f = lambda u: jnp.sum(mj.ops.selective_scan(**{**args, "u": u}, impl=impl))
        return jax.jit(jax.grad(f)).lower(args["u"]).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("reference") >= all_states_bytes
    assert temp_bytes("sequential") < all_states_bytes / 4
    assert temp_bytes("chunked") < all_states_bytes / 4


def test_jit_and_vmap_compose():
    args = make_scan_inputs(2, 2, 20, 6, 3)
    y = jax.jit(lambda a: mj.ops.selective_scan(**a, impl="chunked", chunk_size=8))(args)
    y_ref, _ = selective_scan_oracle(**args)
    assert rel_err(y, y_ref) < TOL["float32"]


BAD = [
    (dict(u=jnp.zeros((2, 5))), ValueError, r"u must have shape \(b, l, d\)"),
    (dict(delta=jnp.zeros((2, 5, 7))), ValueError, r"delta must have shape \(b, l, d\)=\(2, 5, 6\)"),
    (dict(A=jnp.zeros((5, 4))), ValueError, r"A must have shape \(d, n\) with d=6"),
    (dict(B=jnp.zeros((2, 5, 3))), ValueError, r"B must have shape \(b, l, n\)=\(2, 5, 4\)"),
    (dict(B=jnp.zeros((2, 5, 4, 4)), C=jnp.zeros((2, 5, 4, 4))), ValueError, r"groups g=4 in B must divide d=6"),
    (dict(C=jnp.zeros((2, 5, 2, 4))), ValueError, "B and C must have the same groups"),
    (dict(D=jnp.zeros((2, 6))), ValueError, r"D must have shape \(d,\)"),
    (dict(z=jnp.zeros((2, 5, 1))), ValueError, r"z must have shape \(b, l, d\)"),
    (dict(delta_bias=jnp.zeros((1,))), ValueError, r"delta_bias must have shape \(d,\)"),
    (dict(initial_state=jnp.zeros((1, 6, 4))), ValueError, r"initial_state must have shape \(b, d, n\)=\(2, 6, 4\)"),
    (dict(u=jnp.zeros((2, 5, 6), jnp.int32)), TypeError, "u must have a floating dtype"),
    (dict(B=jnp.zeros((2, 5, 4), jnp.int32)), TypeError, "B must have a floating dtype"),
    (dict(impl="fast"), ValueError, "impl='fast' is not one of"),
    (dict(impl="reference", chunk_size=4), ValueError, "chunk_size is only used by impl='sequential', 'chunked' or 'cpu'"),
    (dict(impl="chunked", chunk_size=0), ValueError, "chunk_size=0 must be a positive int"),
]


@pytest.mark.parametrize("override,exc,match", BAD)
def test_bad_inputs_raise(override, exc, match):
    args = dict(u=jnp.ones((2, 5, 6)), delta=jnp.ones((2, 5, 6)), A=-jnp.ones((6, 4)), B=jnp.ones((2, 5, 4)), C=jnp.ones((2, 5, 4)))
    args.update(override)
    with pytest.raises(exc, match=match):
        mj.ops.selective_scan(**args)


@pytest.mark.parametrize("impl", ["reference", "sequential", "chunked", "auto", "pallas"])
def test_seq_idx_packed_documents_match_each_alone(impl):
    """Packed documents (lengths 1, 5, 1, 9, 20 in one row; one-token documents at
    the start and the end of the other): each gets the float64 oracle's outputs for
    it alone; the initial state belongs to the first document; the final state is
    the last document's. Gradients of every input against the reference."""
    lengths = [[1, 5, 1, 9, 20], [30, 5, 1]]
    b, l, d, n = 2, 36, 6, 4
    args = make_scan_inputs(17, b, l, d, n, 2)
    seq_idx = jnp.asarray(np.stack([np.repeat(np.arange(len(r)), r) for r in lengths]), jnp.int32)
    kw = dict(chunk_size=8) if impl in ("sequential", "chunked") else {}
    y, h = mj.ops.selective_scan(**args, delta_softplus=True, return_final_state=True, impl=impl, seq_idx=seq_idx, **kw)
    for row, lens in enumerate(lengths):
        start = 0
        for k, m in enumerate(lens):
            part = {key: (v[row : row + 1, start : start + m] if key in ("u", "delta", "z", "B", "C")
                          else v[row : row + 1] if key == "initial_state" else v) for key, v in args.items()}
            if k > 0:
                part.pop("initial_state")
            y_ref, h_ref = selective_scan_oracle(**part, delta_softplus=True)
            assert rel_err(y[row : row + 1, start : start + m], y_ref) < TOL["float32"], (row, k)
            start += m
        assert rel_err(h[row : row + 1], h_ref) < TOL["float32"], row
    if impl == "reference":
        return
    names = list(args)
    cot = jax.random.normal(jax.random.key(5), (b, l, d), jnp.float32)

    def grads(impl_, **kw_):
        def loss(*values):
            y_, h_ = mj.ops.selective_scan(**dict(zip(names, values)), delta_softplus=True, return_final_state=True,
                                           impl=impl_, seq_idx=seq_idx, **kw_)
            return jnp.sum(y_ * cot) + jnp.sum(h_)

        return jax.grad(loss, argnums=tuple(range(len(names))))(*args.values())

    for name, a, r in zip(names, grads(impl, **kw), grads("reference")):
        assert rel_err(a, r) < GRAD_TOL["float32"], name
    with pytest.raises(ValueError, match=r"seq_idx must have shape \(b, l\)=\(2, 36\)"):
        mj.ops.selective_scan(**args, seq_idx=seq_idx[:, :3])
