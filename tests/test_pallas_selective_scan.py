"""Pallas selective-scan kernels (interpret mode on CPU) against the reference impl.

Both kernels run here in interpret mode: the TPU (Mosaic) kernel, which is
also what ``impl="pallas"`` runs on CPU, and the GPU (Triton) kernel. Shapes
are tiny and never multiples of the blocks (l = 1, l < block_l, primes,
channels that are not multiples of the tile); lowering for the real hardware
is checked with ``jax.export`` from this CPU-only machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
import lowering
from scan_inputs import make_scan_inputs

import mamba_jax as mj
from pallas_kernels.selective_scan import SelectiveScanBlockSizes, selective_scan_pallas
from pallas_kernels.selective_scan import cpu as cpu_scan

# On a GPU machine the GPU kernel runs for real (not interpreted).
ON_GPU = jax.default_backend() == "gpu"

# Relative error ||out - ref|| / ||ref|| allowed for the kernels against the XLA
# reference on the same inputs, per input dtype: for bfloat16 inputs both compute
# in float32, so they differ by the rounding of bf16 outputs and gradients.
KERNEL_TOL = {"float32": 1e-4, "bfloat16": 5e-3}

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# (kernel, b, l, d, n, g, dtype, block_l, options)
CASES = {
    "tpu_l13_groups_all": ("tpu", 2, 13, 12, 3, 2, "float32", 8, dict()),
    "gpu_l11_groups_bf16": ("gpu", 2, 11, 12, 5, 2, "bfloat16", 8, dict(h0=False)),
    "tpu_l1_plain": ("tpu", 1, 1, 8, 3, None, "float32", 8, dict(D=False, z=False, bias=False, h0=False)),
    "gpu_l1_plain": ("gpu", 1, 1, 8, 3, None, "float32", 8, dict(D=False, z=False, bias=False, h0=False)),
    # Model shapes, default block sizes: the wide 1024-channel tile twice per group over
    # two aligned time blocks (n = 16); n = 64 (512-channel tiles, two per group) over an
    # unaligned length in bfloat16.
    "tpu_model_n16_wide_tile": ("tpu", 1, 128, 2048, 16, None, "float32", 64, dict()),
    "tpu_model_n64_l70_bf16": ("tpu", 1, 70, 1024, 64, None, "bfloat16", 64, dict()),
}
SLOW_CASES = {
    "tpu_l11_bf16": ("tpu", 1, 11, 20, 2, 4, "bfloat16", 8, dict(z=False)),
    "tpu_l29_n16_bf16": ("tpu", 2, 29, 20, 16, 4, "bfloat16", 16, dict(h0=False)),
    "gpu_l67_n16": ("gpu", 2, 67, 40, 16, 4, "float32", 16, dict()),
}
ALL_CASES = {**CASES, **SLOW_CASES}


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "non-finite values in the kernel's output"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _split(args):
    """Positional arrays (None where absent) in selective_scan_pallas order."""
    return tuple(args.get(k) for k in ARG_NAMES)


def _reference(arrays, softplus):
    u, delta, A, B, C, D, z, bias, h0 = arrays
    return mj.ops.selective_scan(
        u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=softplus,
        initial_state=h0, return_final_state=True, impl="reference",
    )


def _value_and_grads(fn, wy, wh, diff):
    """(y, final state) and the gradients of a scalar that puts a random
    cotangent on y and on the final state, in one jitted call."""

    def loss(*diff):
        y, hT = fn(*diff)[:2]
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(hT * wh), (y, hT)

    grad_fn = jax.value_and_grad(loss, argnums=tuple(range(len(diff))), has_aux=True)
    (_, (y, hT)), grads = jax.jit(grad_fn)(*diff)
    return y, hT, grads


def _check(kernel_fn, args, softplus, dtype, seed=7, reference=_reference):
    arrays = _split(args)
    present = [i for i, x in enumerate(arrays) if x is not None]

    def with_present(fn):
        def f(*diff):
            full = list(arrays)
            for i, x in zip(present, diff):
                full[i] = x
            return fn(tuple(full))

        return f

    diff = [arrays[i] for i in present]
    b, l, d = arrays[0].shape
    k1, k2 = jax.random.split(jax.random.key(seed))
    wy = jax.random.normal(k1, (b, l, d), jnp.float32)
    wh = jax.random.normal(k2, (b, d, arrays[2].shape[1]), jnp.float32)
    y_ref, h_ref, g_ref = _value_and_grads(with_present(lambda a: reference(a, softplus)), wy, wh, diff)
    y, h, g = _value_and_grads(with_present(kernel_fn), wy, wh, diff)
    tol = KERNEL_TOL[dtype]
    assert y.dtype == arrays[0].dtype and h.dtype == jnp.float32
    assert rel_err(y, y_ref) < tol
    assert rel_err(h, h_ref) < tol
    for i, a, b in zip(present, g, g_ref):
        assert a.dtype == b.dtype, ARG_NAMES[i]
        err = rel_err(a, b)
        assert err < tol, f"gradient of {ARG_NAMES[i]}: {err=}"


@pytest.mark.parametrize(
    "case", list(CASES) + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CASES]
)
def test_kernel_matches_reference(case):
    kernel, b, l, d, n, g, dtype, block_l, opts = ALL_CASES[case]
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    args = make_scan_inputs(list(ALL_CASES).index(case), b, l, d, n, g, dtype=jnp.dtype(dtype), **opts)
    bs = SelectiveScanBlockSizes(block_l=block_l)

    def kernel_fn(a):
        u, delta, A, B, C, D, z, bias, h0 = a
        return selective_scan_pallas(
            u, delta, A, B, C, D, z, bias, softplus, h0, block_sizes=bs, platform=kernel,
            interpret=not (kernel == "gpu" and ON_GPU),
        )

    _check(kernel_fn, args, softplus, dtype)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_kernel_packed_documents_match_reference(kernel):
    """``continuation`` (packed documents): boundaries inside a time block, on a block's
    first step (t = 8, 16), one-token documents, the initial state of the first
    document; outputs, final state and every gradient against the reference with seq_idx."""
    lengths = [[1, 7, 8, 1, 5, 7], [16, 13]]
    seq_idx = jnp.asarray(np.stack([np.repeat(np.arange(len(r)), r) for r in lengths]), jnp.int32)
    keep = np.ones(seq_idx.shape, np.float32)
    keep[:, 1:] = np.asarray(seq_idx[:, 1:] == seq_idx[:, :-1], np.float32)
    args = make_scan_inputs(41, 2, 29, 12, 4, 2, dtype=jnp.float32)
    bs = SelectiveScanBlockSizes(block_l=8)

    def kernel_fn(a):
        u, delta, A, B, C, D, z, bias, h0 = a
        return selective_scan_pallas(
            u, delta, A, B, C, D, z, bias, True, h0, continuation=jnp.asarray(keep), block_sizes=bs,
            platform=kernel, interpret=not (kernel == "gpu" and ON_GPU),
        )

    def reference(a, softplus):
        u, delta, A, B, C, D, z, bias, h0 = a
        return mj.ops.selective_scan(
            u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=softplus, initial_state=h0,
            seq_idx=seq_idx, return_final_state=True, impl="reference",
        )

    _check(kernel_fn, args, True, "float32", reference=reference)


def test_public_impl_pallas_on_cpu():
    """impl="pallas" through the public dispatcher (default blocks: l < block_l)."""
    args = make_scan_inputs(3, 2, 5, 10, 2, None)

    def kernel_fn(a):
        u, delta, A, B, C, D, z, bias, h0 = a
        return mj.ops.selective_scan(
            u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True,
            initial_state=h0, return_final_state=True, impl="pallas",
        )

    _check(kernel_fn, args, True, "float32")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="TPU interpret mode is exercised on CPU")
def test_uninitialised_scratch_is_never_read():
    """TPU interpret mode fills every buffer it allocates (VMEM scratch, output
    blocks) with NaN; a kernel that read memory it never wrote would return NaN."""
    params = pltpu.InterpretParams(uninitialized_memory="nan")
    args = make_scan_inputs(11, 1, 11, 8, 2, None)
    bs = SelectiveScanBlockSizes(block_l=8)

    def kernel_fn(a):
        u, delta, A, B, C, D, z, bias, h0 = a
        return selective_scan_pallas(
            u, delta, A, B, C, D, z, bias, True, h0, block_sizes=bs, platform="tpu", interpret=params
        )

    _check(kernel_fn, args, True, "float32")


def test_state_interval():
    """States every K steps equal the final states of the prefixes, with gradients."""
    K, l = 8, 17
    args = make_scan_inputs(5, 1, l, 6, 2, None, z=False)
    u, delta, A, B, C, D, _, bias, h0 = _split(args)
    bs = SelectiveScanBlockSizes(block_l=8)

    def states_kernel(u):
        return selective_scan_pallas(
            u, delta, A, B, C, D, None, bias, True, h0, block_sizes=bs, state_interval=K, platform="tpu",
            interpret=True,
        )[2]

    def states_ref(u):
        return jnp.stack([
            _reference((u[:, :m], delta[:, :m], A, B[:, :m], C[:, :m], D, None, bias, h0), True)[1]
            for m in range(K, l + 1, K)
        ], axis=1)

    w = jax.random.normal(jax.random.key(0), (1, l // K, 6, 2), jnp.float32)
    vg = lambda fn: jax.jit(jax.value_and_grad(lambda u: (jnp.sum(fn(u) * w), fn(u)), has_aux=True))(u)
    (_, s), g = vg(states_kernel)
    (_, s_ref), g_ref = vg(states_ref)
    assert s.shape == (1, l // K, 6, 2)
    assert rel_err(s, s_ref) < KERNEL_TOL["float32"]
    assert rel_err(g, g_ref) < KERNEL_TOL["float32"]


CUSTOM_CALLS = {"tpu": lowering.CUSTOM_CALLS["tpu"], "cuda": lowering.CUSTOM_CALLS["triton"]}


def _export(fn, platform, *shapes):
    return lowering.export_for(platform, fn, *shapes)


@pytest.mark.parametrize("packed", [False, True], ids=["", "packed"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_hardware(platform, packed):
    """impl="pallas" exports for TPU / CUDA from a CPU-only machine, forward and
    backward (with packed documents too), and the exported module holds the kernel's custom call."""
    b, l, d, n, g = 2, 100, 256, 16, 2
    args = make_scan_inputs(0, b, l, d, n, g, dtype=jnp.bfloat16)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in args.items()}
    seq_idx = jnp.asarray(np.arange(l) // 30, jnp.int32)[None].repeat(b, 0) if packed else None

    def f(a):
        return mj.ops.selective_scan(**a, delta_softplus=True, return_final_state=True, impl="pallas", seq_idx=seq_idx)

    def loss(a):
        y, h = f(a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    name = CUSTOM_CALLS[platform]
    fwd = _export(f, platform, shapes)
    assert fwd.mlir_module().count(name) == 1
    assert [o.shape for o in fwd.out_avals] == [(b, l, d), (b, d, n)]
    bwd = _export(jax.grad(loss), platform, shapes)
    assert bwd.mlir_module().count(name) == 2  # forward and backward kernels


# (platform, n, l) -> the kernel auto embeds (None: an XLA implementation).
AUTO_EMBEDS = {
    ("tpu", 16, 64): "tpu", ("tpu", 64, 100): "tpu", ("tpu", 128, 64): "tpu",
    ("tpu", 32, 100): None, ("tpu", 16, 1): None, ("tpu", 16, 63): None,
    ("cuda", 16, 100): "cuda", ("cuda", 64, 100): None, ("cuda", 16, 1): None, ("cuda", 16, 30): None,
}


@pytest.mark.parametrize("platform, n, l", list(AUTO_EMBEDS))
def test_auto_embeds_exactly_the_verified_kernel(platform, n, l):
    """What impl="auto" puts in a function exported for each platform: the kernel
    of that platform for verified state sizes and lengths of at least one block,
    no kernel at all (the plain recurrence, or chunked) otherwise; never the other
    platform's kernel, never more than one."""
    args = make_scan_inputs(1, 1, l, 128, n, None)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in args.items()}
    f = lambda a: mj.ops.selective_scan(**a, delta_softplus=True, return_final_state=True)
    text = _export(f, platform, shapes).mlir_module()
    counts = {p: text.count(name) for p, name in CUSTOM_CALLS.items()}
    expected = AUTO_EMBEDS[(platform, n, l)]
    assert counts == {p: int(p == expected) for p in CUSTOM_CALLS}, counts


def test_auto_policy():
    resolve = mj.ops.resolve_impl
    assert resolve("cpu", 16, 4096) == ("sequential" if cpu_scan.unavailable_reason() else "cpu")
    for backend in ("tpu", "cuda", "gpu"):
        assert resolve(backend, 16, 4096) == "pallas"
        assert resolve(backend, 16, 1) == "step"
        assert resolve(backend, 16, 63) == "sequential"
        assert resolve(backend, 1024, 4096) == "chunked"
    assert resolve("tpu", 64, 4096) == resolve("tpu", 128, 4096) == "pallas"
    assert resolve("cuda", 64, 4096) == "chunked"  # the GPU kernel ran on hardware at n = 16 only
    assert resolve("gpu", 16, 4096, compute_capability="7.5") == "chunked"  # T4: no Triton kernel
    assert resolve("gpu", 16, 4096, compute_capability="9.0") == "pallas"
    assert resolve("rocm", 16, 4096) == "chunked"


def test_errors_name_the_argument():
    args = make_scan_inputs(1, 1, 5, 8, 4, None)
    arrays = _split(args)
    with pytest.raises(ValueError, match="state_interval"):
        selective_scan_pallas(*arrays[:8], True, arrays[8], platform="tpu", state_interval=12)
    with pytest.raises(ValueError, match="tpu_block_d"):
        SelectiveScanBlockSizes(tpu_block_d=100)
    with pytest.raises(ValueError, match="gpu_block_d"):
        SelectiveScanBlockSizes(gpu_block_d=48)
    with pytest.raises(ValueError, match="platform"):
        selective_scan_pallas(*arrays[:8], True, arrays[8], platform="metal")
    with pytest.raises(ValueError, match="block_l"):
        SelectiveScanBlockSizes(block_l=0)
    big = make_scan_inputs(1, 1, 5, 8, 200, None)
    with pytest.raises(ValueError, match="n=200"):
        mj.ops.selective_scan(**big, impl="pallas")
    with pytest.raises(ValueError, match="tpu_block_d=1024"):  # over the VMEM budget, before lowering
        selective_scan_pallas(**make_scan_inputs(1, 1, 5, 8, 128, None), platform="tpu",
                              block_sizes=SelectiveScanBlockSizes(tpu_block_d=1024))
    with pytest.raises(ValueError, match="B must have shape"):  # the dispatcher's validator
        selective_scan_pallas(*arrays[:3], arrays[3][:, :4], *arrays[4:8], True, arrays[8], platform="tpu")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_model_decode_step_has_no_scan_kernel(platform):
    """A one-token step of the model lowers to plain XLA (the recurrence written
    out), while a prefill of one kernel block or more embeds the platform's kernel."""
    from flax import nnx

    cfg = mj.MambaConfig(d_model=64, n_layer=2, vocab_size=64)
    model = mj.MambaLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1)

    def step(params, cache, ids):
        return nnx.merge(graphdef, params)(ids, cache=cache)

    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    name = CUSTOM_CALLS[platform]
    for length, has_kernel in ((1, False), (64, True)):  # (the layers share one kernel function)
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
        text = _export(step, platform, abstract(params), abstract(cache), ids).mlir_module()
        assert (name in text) == has_kernel, length
