"""mamba_jax.ops.ssd (every implementation) and ssd_step against a float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOL, rel_err
from ssd_oracle import ssd_oracle

import mamba_jax as mj

IMPLS = ["reference", "chunked", "auto"]
GRAD_TOL = {"float32": 1e-5, "bfloat16": 1e-3}  # chunked vs reference gradients, same inputs


def make_ssd_inputs(seed, b, l, h, p, g, n, *, dtype=jnp.float32, D="head", z=True, bias=True, h0=True,
                    softplus=True):
    """Keyword arguments of ssd; fresh random values per seed, never zeros.

    dt is drawn so that the processed step is ~0.1: a state remembers tens of
    steps, across several chunks of the sizes tested.
    """
    rng = np.random.default_rng(seed)  # NumPy draws and arithmetic: no XLA compilation per shape
    normal = lambda *shape: rng.standard_normal(shape)
    dt = -2.0 + 0.5 * normal(b, l, h) if softplus else 0.02 + 0.1 * np.abs(normal(b, l, h))  # else: a positive step
    to = lambda v, dt_=jnp.float32: jnp.asarray(np.asarray(v, np.float32).astype(dt_))
    args = dict(
        x=to(normal(b, l, h, p), dtype),
        dt=to(dt, dtype),
        A=to(-np.exp(0.5 * normal(h))),
        B=to(normal(b, l, g, n), dtype),
        C=to(normal(b, l, g, n), dtype),
    )
    if D == "head":
        args["D"] = to(normal(h))
    elif D == "channel":
        args["D"] = to(normal(h, p))
    if z:
        args["z"] = to(normal(b, l, h, p), dtype)
    if bias:
        args["dt_bias"] = to(0.5 * normal(h))
    if h0:
        args["initial_state"] = to(normal(b, h, p, n))
    return args


def documents(lengths_per_row):
    """seq_idx (b, l) int32 from document lengths per row (ids 0, 1, 2, ... per row)."""
    rows = [np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row]
    assert len({len(r) for r in rows}) == 1
    return jnp.asarray(np.stack(rows), jnp.int32)


# name: (b, l, h, p, g, n, chunk_size, options). Chunk 16: lengths 1, primes, below, at and above it.
CASES = {
    "l1": (2, 1, 4, 3, 2, 5, 16, dict()),
    "l7_groups2": (1, 7, 4, 3, 2, 4, 16, dict(h0=False)),
    "l16_plain": (2, 16, 2, 4, 1, 3, 16, dict(D=None, z=False, bias=False, h0=False, softplus=False)),
    "l37_groups3_Dchannel": (2, 37, 6, 4, 3, 5, 16, dict(D="channel")),
    "l67_groups1": (1, 67, 4, 2, 1, 4, 16, dict(bias=False)),
    "l50_groups4_limit": (1, 50, 8, 2, 4, 3, 16, dict(D="channel", dt_limit=(0.05, 0.3))),
}


def _case(name, dtype=jnp.float32):
    b, l, h, p, g, n, T, opts = CASES[name]
    opts = dict(opts)
    kw = dict(chunk_size=T, dt_softplus=opts.get("softplus", True), dt_limit=opts.pop("dt_limit", (0.0, float("inf"))))
    args = make_ssd_inputs(list(CASES).index(name), b, l, h, p, g, n, dtype=dtype, **opts)
    return args, kw


def _oracle(args, kw, seq_idx=None):
    return ssd_oracle(**args, dt_softplus=kw["dt_softplus"], dt_limit=kw["dt_limit"], seq_idx=seq_idx)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_float64_oracle(impl, case):
    args, kw = _case(case)
    y, h = mj.ops.ssd(**args, **kw, return_final_state=True, impl=impl)
    y_ref, h_ref = _oracle(args, kw)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert y.shape == args["x"].shape and h.shape == h_ref.shape
    assert rel_err(y, y_ref) < TOL["float32"], rel_err(y, y_ref)
    assert rel_err(h, h_ref) < TOL["float32"], rel_err(h, h_ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs(impl):
    args, kw = _case("l37_groups3_Dchannel", jnp.bfloat16)
    y, h = mj.ops.ssd(**args, **kw, return_final_state=True, impl=impl)
    y_ref, h_ref = _oracle(args, kw)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < TOL["bfloat16"]
    # The state is float32 arithmetic on bf16-rounded inputs: as exact as float32.
    assert rel_err(h, h_ref) < TOL["float32"]


# Documents of length 1 at the start, in the middle, at the end and across the
# chunk boundaries (chunk 8), a boundary exactly on a chunk edge, and a row of
# one document.
SEQ_ROWS = [[1, 7, 1, 1, 9, 8, 1, 1], [8, 8, 1, 5, 6, 1]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("h0", [False, True])
def test_seq_idx_matches_oracle(impl, h0):
    seq_idx = documents(SEQ_ROWS)
    args = make_ssd_inputs(40, 2, 29, 4, 3, 2, 4, D="channel", h0=h0)
    kw = dict(chunk_size=8, dt_softplus=True, dt_limit=(0.0, float("inf")))
    y, h = mj.ops.ssd(**args, **kw, seq_idx=seq_idx, return_final_state=True, impl=impl)
    y_ref, h_ref = _oracle(args, kw, seq_idx)
    assert rel_err(y, y_ref) < TOL["float32"] and rel_err(h, h_ref) < TOL["float32"]
    # No state crosses a boundary: each document run alone gives the same outputs.
    y, h = np.asarray(y), np.asarray(h)
    for row, lengths in enumerate(SEQ_ROWS):
        start = 0
        for k, ln in enumerate(lengths):
            part = {name: (np.asarray(v)[row : row + 1, start : start + ln] if v.ndim >= 3 else v)
                    for name, v in args.items() if name != "initial_state"}
            if k == 0 and h0:
                part["initial_state"] = args["initial_state"][row : row + 1]
            y_doc, h_doc = _oracle(part, kw)
            assert rel_err(y[row : row + 1, start : start + ln], y_doc) < TOL["float32"], (row, k)
            start += ln
        assert rel_err(h[row : row + 1], h_doc) < TOL["float32"]


def test_seq_idx_bfloat16_and_ids_need_not_be_dense():
    """Only where the id changes matters: ids 3, 3, 10, 11, ... act like 0, 0, 1, 2, ..."""
    seq_idx = jnp.asarray(np.asarray(documents(SEQ_ROWS)) * 7 + 3)
    args = make_ssd_inputs(41, 2, 29, 4, 3, 2, 4, dtype=jnp.bfloat16)
    kw = dict(chunk_size=8, dt_softplus=True, dt_limit=(0.0, float("inf")))
    y_ref, h_ref = _oracle(args, kw, seq_idx)
    for impl in ("reference", "chunked"):
        y, h = mj.ops.ssd(**args, **kw, seq_idx=seq_idx, return_final_state=True, impl=impl)
        assert rel_err(y, y_ref) < TOL["bfloat16"] and rel_err(h, h_ref) < TOL["float32"]


def test_default_chunk_and_auto_policy():
    args = make_ssd_inputs(3, 1, 300, 2, 4, 1, 8)
    y_ref, h_ref = ssd_oracle(**args, dt_softplus=True)
    y, h = mj.ops.ssd(**args, dt_softplus=True, return_final_state=True)  # chunk_size=256, impl="auto"
    assert rel_err(y, y_ref) < TOL["float32"] and rel_err(h, h_ref) < TOL["float32"]
    for backend in ("cpu", "cuda", "gpu", "rocm"):  # the TPU policy: tests/test_pallas_ssd.py
        assert mj.ops.resolve_ssd_impl(backend, state_size=128, seq_len=4096) == "chunked"


def _grads(impl, args, kw, cot_y, cot_h, seq_idx=None):
    names = list(args)

    def loss(*values):
        y, h = mj.ops.ssd(**dict(zip(names, values)), **kw, seq_idx=seq_idx, return_final_state=True, impl=impl)
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h)

    return dict(zip(names, jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*args.values())))


@pytest.mark.parametrize(
    "case,dtype",
    [("l37_groups3_Dchannel", "float32"), ("l50_groups4_limit", "float32"), ("l7_groups2", "bfloat16"),
     ("seq_idx", "float32"), ("seq_idx", "bfloat16")],
)
def test_gradients_match_reference(case, dtype):
    """Every input's gradient (initial state included), chunked vs autodiff of the reference."""
    seq_idx = None
    if case == "seq_idx":
        args = make_ssd_inputs(42, 2, 29, 4, 3, 2, 4, dtype=jnp.dtype(dtype))
        kw = dict(chunk_size=8, dt_softplus=True, dt_limit=(0.0, float("inf")))
        seq_idx = documents(SEQ_ROWS)
    else:
        args, kw = _case(case, jnp.dtype(dtype))
    if "initial_state" not in args:
        args["initial_state"] = jnp.ones(args["x"].shape[:1] + args["x"].shape[2:] + args["B"].shape[-1:]) * 0.3
    b, l, h, p = args["x"].shape
    rng = np.random.default_rng(99)
    cot_y = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
    cot_h = jnp.asarray(rng.standard_normal(args["initial_state"].shape), jnp.float32)
    ref = _grads("reference", args, kw, cot_y, cot_h, seq_idx)
    out = _grads("chunked", args, kw, cot_y, cot_h, seq_idx)
    assert set(out) >= {"x", "dt", "A", "B", "C", "D", "initial_state"}
    for name in ref:
        assert out[name].dtype == args[name].dtype, name
        assert rel_err(out[name], ref[name]) < GRAD_TOL[dtype], (name, rel_err(out[name], ref[name]))


def test_reference_gradient_against_finite_differences():
    """Autodiff through the reference (float32) against central differences of
    the float64 oracle along a random direction of every input at once."""
    args = make_ssd_inputs(8, 1, 6, 4, 2, 2, 3, D="channel")
    seq_idx = documents([[2, 1, 3]])
    kw = dict(dt_softplus=True, dt_limit=(0.0, float("inf")))
    names = list(args)
    rng = np.random.default_rng(0)
    dirs = {k: rng.standard_normal(np.shape(v)) for k, v in args.items()}
    w = rng.standard_normal(args["x"].shape)

    def f64(values):
        y, h = ssd_oracle(**values, **kw, seq_idx=seq_idx, as_float64=True)
        return float(np.sum(y * w) + np.sum(h))

    eps = 1e-5
    plus = {k: np.asarray(v, np.float64) + eps * dirs[k] for k, v in args.items()}
    minus = {k: np.asarray(v, np.float64) - eps * dirs[k] for k, v in args.items()}
    fd = (f64(plus) - f64(minus)) / (2 * eps)

    def loss(*values):
        y, h = mj.ops.ssd(**dict(zip(names, values)), **kw, seq_idx=seq_idx, return_final_state=True,
                          impl="reference")
        return jnp.sum(y * jnp.asarray(w, jnp.float32)) + jnp.sum(h)

    grads = jax.grad(loss, argnums=tuple(range(len(names))))(*args.values())
    directional = sum(float(np.vdot(np.asarray(g, np.float64), dirs[k])) for k, g in zip(names, grads))
    assert abs(directional - fd) < 1e-5 * abs(fd), (directional, fd)


def test_chunked_training_memory_is_per_chunk():
    """XLA's compiled memory statistics of the backward pass: the chunked path
    keeps the chunk-boundary states (b, l/T, h, p, n) and per-chunk (T, T) masks
    (b, l, T, h), never all (b, l, h, p, n) states (the reference keeps them all)."""
    b, l, h, p, g, n, T = 1, 1024, 2, 64, 1, 128, 64
    args = make_ssd_inputs(0, b, l, h, p, g, n, D=None, z=False, bias=False, h0=False)
    all_states = b * l * h * p * n * 4
    boundary_states = b * (l // T) * h * p * n * 4
    masks = b * l * T * h * 4
    inputs = sum(v.size * v.dtype.itemsize for v in args.values())

    def temp_bytes(impl):  # every input an argument (not a constant XLA would fold)
        f = lambda a: jnp.sum(mj.ops.ssd(**a, chunk_size=T, dt_softplus=True, impl=impl))
        return jax.jit(jax.grad(f)).lower(args).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes("chunked")
    assert chunked < all_states / 4, (chunked, all_states)
    assert chunked < 8 * (boundary_states + masks + inputs), (chunked, boundary_states, masks, inputs)


def test_jit_vmap_compose():
    args = make_ssd_inputs(2, 2, 20, 4, 3, 2, 3)
    f = lambda a: mj.ops.ssd(**a, chunk_size=8, dt_softplus=True, impl="chunked")
    y_ref, _ = ssd_oracle(**args, dt_softplus=True)
    assert rel_err(jax.jit(f)(args), y_ref) < TOL["float32"]
    # vmap over a leading axis of everything per-row (A, D, dt_bias shared)
    shared = ("A", "D", "dt_bias")
    rows = {k: (v if k in shared else v[:, None]) for k, v in args.items()}
    axes = {k: (None if k in shared else 0) for k in args}
    y = jax.vmap(f, in_axes=(axes,))(rows)[:, 0]
    assert rel_err(y, y_ref) < TOL["float32"]


def test_auto_lowers_for_every_platform():
    """impl="auto" (chunked everywhere) with its backward lowers for cpu, cuda and tpu."""
    from jax import export

    args = make_ssd_inputs(6, 1, 40, 4, 8, 2, 16, dtype=jnp.bfloat16, D="channel")
    seq_idx = documents([[15, 1, 24]])

    def loss(a, s):
        y, h = mj.ops.ssd(**a, chunk_size=16, seq_idx=s, dt_softplus=True, return_final_state=True)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    exported = export.export(jax.jit(jax.value_and_grad(loss)), platforms=("cpu", "cuda", "tpu"))(args, seq_idx)
    assert exported.platforms == ("cpu", "cuda", "tpu")


# ----------------------------------------------------------------------------
# ssd_step: the decode update
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,g,D", [("float32", 1, "head"), ("float32", 2, "channel"), ("bfloat16", 4, None)])
def test_ssd_step_matches_oracle(dtype, g, D):
    """Ten decode steps from a random state against the oracle run over the same
    ten tokens; the gradients of one step against the reference at l = 1."""
    args = make_ssd_inputs(21 + g, 2, 10, 4, 3, g, 5, dtype=jnp.dtype(dtype), D=D, h0=True)
    kw = dict(dt_softplus=True, dt_limit=(0.01, 0.5))
    y_ref, h_ref = ssd_oracle(**args, **kw)
    per_token = ("x", "dt", "B", "C", "z")
    state = args["initial_state"]
    ys = []
    for t in range(10):
        step = {k: (jnp.asarray(np.asarray(v)[:, t]) if k in per_token else v) for k, v in args.items()
                if k != "initial_state"}
        y, state = mj.ops.ssd_step(state, **step, **kw)
        assert y.dtype == args["x"].dtype and y.shape == (2, 4, 3) and state.dtype == jnp.float32
        ys.append(y)
    assert rel_err(jnp.stack(ys, 1), y_ref) < TOL[dtype]
    assert rel_err(state, h_ref) < TOL["float32"]

    one = {k: (v[:, :1] if k in per_token else v) for k, v in args.items()}
    rng = np.random.default_rng(3)
    cot_y = jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32)
    cot_h = jnp.asarray(rng.standard_normal((2, 4, 3, 5)), jnp.float32)
    names = list(one)

    def step_loss(*values):
        a = dict(zip(names, values))
        st = a.pop("initial_state")
        y, h = mj.ops.ssd_step(st, **{k: (v[:, 0] if k in per_token else v) for k, v in a.items()}, **kw)
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h)

    def ref_loss(*values):
        y, h = mj.ops.ssd(**dict(zip(names, values)), **kw, return_final_state=True, impl="reference")
        return jnp.sum(y[:, 0].astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h)

    argnums = tuple(range(len(names)))
    out = jax.jit(jax.grad(step_loss, argnums=argnums))(*one.values())
    ref = jax.jit(jax.grad(ref_loss, argnums=argnums))(*one.values())
    for name, o, r in zip(names, out, ref):
        assert o.dtype == one[name].dtype, name
        assert rel_err(o, r) < (1e-5 if dtype == "float32" else 1e-3), name


# ----------------------------------------------------------------------------
# Validation: errors name the argument and the expected shape
# ----------------------------------------------------------------------------

BAD = [
    (dict(x=jnp.zeros((2, 5, 6))), ValueError, r"x must have shape \(b, l, h, p\)"),
    (dict(x=jnp.zeros((2, 0, 4, 3)), dt=jnp.zeros((2, 0, 4)), B=jnp.zeros((2, 0, 2, 5)), C=jnp.zeros((2, 0, 2, 5))),
     ValueError, r"zero length along time"),
    (dict(dt=jnp.zeros((2, 5, 3))), ValueError, r"dt must have shape \(b, l, h\)=\(2, 5, 4\)"),
    (dict(A=jnp.zeros((4, 1))), ValueError, r"A must have shape \(h,\)=\(4,\)"),
    (dict(B=jnp.zeros((2, 5, 5))), ValueError, r"B must have shape \(b, l, g, n\)"),
    (dict(B=jnp.zeros((2, 5, 3, 5)), C=jnp.zeros((2, 5, 3, 5))), ValueError, r"groups g=3 in B .* must divide .* h=4"),
    (dict(C=jnp.zeros((2, 5, 1, 5))), ValueError, r"C must have shape \(b, l, g, n\) like B=\(2, 5, 2, 5\)"),
    (dict(D=jnp.zeros((4, 2))), ValueError, r"D must have shape \(h,\)=\(4,\) or \(h, p\)=\(4, 3\)"),
    (dict(D=jnp.zeros((1,))), ValueError, r"D must have shape \(h,\)"),
    (dict(z=jnp.zeros((2, 5, 4, 1))), ValueError, r"z must have shape \(b, l, h, p\) like x=\(2, 5, 4, 3\)"),
    (dict(dt_bias=jnp.zeros((1,))), ValueError, r"dt_bias must have shape \(h,\)=\(4,\)"),
    (dict(initial_state=jnp.zeros((2, 4, 3, 4))), ValueError,
     r"initial_state must have shape \(b, h, p, n\)=\(2, 4, 3, 5\)"),
    (dict(seq_idx=jnp.zeros((2, 4), jnp.int32)), ValueError, r"seq_idx must have shape \(b, l\)=\(2, 5\)"),
    (dict(seq_idx=jnp.zeros((2, 5))), TypeError, r"seq_idx must have an integer dtype"),
    (dict(x=jnp.zeros((2, 5, 4, 3), jnp.int32)), TypeError, r"x must have a floating dtype"),
    (dict(B=np.zeros((2, 5, 2, 5), np.int32)), TypeError, r"B must have a floating dtype"),
    (dict(dt_limit=(1.0,)), ValueError, r"dt_limit must be a pair"),
    (dict(dt_limit=(0.5, 0.1)), ValueError, r"dt_limit must have lo <= hi"),
    (dict(chunk_size=0), ValueError, r"chunk_size=0 must be a positive int"),
    (dict(impl="fast"), ValueError, r"impl='fast' is not one of"),
]


@pytest.mark.parametrize("override,exc,match", BAD)
def test_bad_inputs_raise(override, exc, match):
    args = dict(x=jnp.ones((2, 5, 4, 3)), dt=jnp.ones((2, 5, 4)), A=-jnp.ones((4,)), B=jnp.ones((2, 5, 2, 5)),
                C=jnp.ones((2, 5, 2, 5)))
    args.update(override)
    with pytest.raises(exc, match=match):
        mj.ops.ssd(**args)


@pytest.mark.parametrize(
    "override,exc,match",
    [
        (dict(x=jnp.zeros((2, 1, 4, 3))), ValueError, r"x must have shape \(b, h, p\)"),
        (dict(dt=jnp.zeros((2, 1, 4))), ValueError, r"dt must have shape \(b, h\)=\(2, 4\)"),
        (dict(B=jnp.zeros((2, 1, 2, 5))), ValueError, r"B must have shape \(b, g, n\)"),
        (dict(state=jnp.zeros((2, 4, 3))), ValueError, r"state must have shape \(b, h, p, n\)=\(2, 4, 3, 5\)"),
        (dict(z=jnp.zeros((2, 4))), ValueError, r"z must have shape \(b, h, p\) like x=\(2, 4, 3\)"),
    ],
)
def test_ssd_step_bad_inputs_raise(override, exc, match):
    args = dict(state=jnp.ones((2, 4, 3, 5)), x=jnp.ones((2, 4, 3)), dt=jnp.ones((2, 4)), A=-jnp.ones((4,)),
                B=jnp.ones((2, 2, 5)), C=jnp.ones((2, 2, 5)))
    args.update(override)
    with pytest.raises(exc, match=match):
        mj.ops.ssd_step(**args)


@pytest.mark.slow
@pytest.mark.parametrize("g", [1, 8])
def test_model_shapes_against_oracle(g):
    """Mamba-2 shapes (24 heads x 64, n = 128, chunk 256, an unaligned length with
    packed documents): chunked forward vs the oracle in float32 and bfloat16, and
    gradients of every input vs the reference at a smaller model-like shape."""
    lengths = [[100, 1, 255, 244]]
    for dtype in ("float32", "bfloat16"):
        args = make_ssd_inputs(70 + g, 1, 600, 24, 64, g, 128, dtype=jnp.dtype(dtype), D="head")
        kw = dict(chunk_size=256, dt_softplus=True, dt_limit=(0.0, float("inf")))
        y, h = mj.ops.ssd(**args, **kw, seq_idx=documents(lengths), return_final_state=True, impl="chunked")
        y_ref, h_ref = _oracle(args, kw, documents(lengths))
        assert rel_err(y, y_ref) < TOL[dtype] and rel_err(h, h_ref) < TOL["float32"]
    args = make_ssd_inputs(80 + g, 1, 300, 8, 64, g, 64, D="channel")
    kw = dict(chunk_size=128, dt_softplus=True, dt_limit=(0.0, float("inf")))
    rng = np.random.default_rng(1)
    cot_y = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
    cot_h = jnp.asarray(rng.standard_normal(args["initial_state"].shape), jnp.float32)
    seq_idx = documents([[7, 1, 150, 142]])
    ref = _grads("reference", args, kw, cot_y, cot_h, seq_idx)
    out = _grads("chunked", args, kw, cot_y, cot_h, seq_idx)
    for name in ref:
        assert rel_err(out[name], ref[name]) < GRAD_TOL["float32"], (name, rel_err(out[name], ref[name]))
