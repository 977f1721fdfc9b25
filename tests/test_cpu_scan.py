"""The native CPU selective-scan kernel (impl="cpu", pallas_kernels/selective_scan/cpu.py):
forward against the float64 oracle, every gradient against autodiff through the
reference implementation, packed documents against the reference with its
continuation mask; the dispatch (auto embeds it on CPU, nowhere else), the
errors, and results that do not depend on the number of threads."""

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GRAD_TOL, TOL, rel_err, selective_scan_oracle
from scan_inputs import make_scan_inputs

import lowering
import mamba_jax as mj

scan_module = sys.modules["mamba_jax.ops.selective_scan"]
from pallas_kernels.selective_scan import cpu  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
FWD, BWD = "mamba_selective_scan_fwd", "mamba_selective_scan_bwd"

# Without a C++ compiler the kernel cannot exist: skip with the reason, except under CI, where
# the missing compiler must fail (the tests then raise the build error) rather than hide the kernel.
pytestmark = pytest.mark.skipif(
    cpu.unavailable_reason() is not None and os.environ.get("CI") != "true", reason=f"{cpu.unavailable_reason()}"
)


def _seq_idx(b, l, seed=0):
    """Document ids with a few boundaries per row (one at t = 1 in row 0)."""
    starts = np.random.default_rng(seed).random((b, l)) < 0.08
    starts[0, 1] = True
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def _run(impl, args, seq_idx, chunk_size=None, softplus=True):
    kw = {} if chunk_size is None else dict(chunk_size=chunk_size)
    return mj.ops.selective_scan(**args, delta_softplus=softplus, return_final_state=True, impl=impl, seq_idx=seq_idx,
                                 **kw)


def _grads(impl, args, seq_idx, cot_y, cot_h, chunk_size=None, softplus=True):
    names = [k for k in NAMES if k in args]

    def loss(*values):
        y, h = _run(impl, dict(zip(names, values)), seq_idx, chunk_size, softplus)
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h * cot_h)

    return dict(zip(names, jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*(args[k] for k in names))))


# (b, l, d, n, g), chunk_size (None: the default 64), packed documents, initial state
CASES = [
    ((2, 70, 64, 16, None), None, False, True),  # l not a multiple of the chunk, n as in the models
    ((2, 63, 40, 5, 2), 16, True, True),  # odd n, two groups of 20 channels (a partial channel block)
    ((2, 70, 80, 16, 2), 32, True, False),  # 40 channels per group: a full and a partial block
    ((3, 1, 8, 16, 1), None, False, True),  # one step
    ((1, 130, 96, 16, 1), 64, True, True),  # three chunks, the last one short
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape, chunk, packed, h0", CASES, ids=[str(c[0]) for c in CASES])
def test_matches_oracle_and_reference(shape, chunk, packed, h0, dtype):
    b, l, d, n, g = shape
    args = make_scan_inputs(11, b, l, d, n, g, dtype=dtype, h0=h0)
    seq_idx = _seq_idx(b, l) if packed else None
    name = jnp.dtype(dtype).name
    y, h = _run("cpu", args, seq_idx, chunk)
    assert y.dtype == dtype and h.dtype == jnp.float32
    y_ref, h_ref = _run("reference", args, seq_idx)  # the same float32 inputs, associative scan
    if not packed:  # the float64 oracle has no document boundaries
        y64, h64 = selective_scan_oracle(**args, delta_softplus=True)
        assert rel_err(y, y64) < TOL[name] and rel_err(h, h64) < TOL["float32"]
    assert rel_err(y, y_ref) < TOL[name] and rel_err(h, h_ref) < TOL["float32"]
    kc = jax.random.split(jax.random.key(5))
    cot_y = jax.random.normal(kc[0], (b, l, d), jnp.float32)
    cot_h = jax.random.normal(kc[1], (b, d, n), jnp.float32)
    ref = _grads("reference", args, seq_idx, cot_y, cot_h)
    out = _grads("cpu", args, seq_idx, cot_y, cot_h, chunk)
    assert set(out) == set(ref) == {k for k in NAMES if k in args}
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == args[k].dtype, k
        # bf16: both gradients are float32 arithmetic on the same bf16 inputs, rounded to bf16 at the end.
        assert rel_err(out[k], ref[k]) < GRAD_TOL[name], k


# Which of D, z, delta_bias are given, softplus, and a scale on delta (x 30: softplus and
# its gradient far into both tails, where the kernel's own exp/log1p take over).
OPTIONAL = [
    (dict(D=False, z=False, bias=False), False, 1.0),  # the bare recurrence, delta used as dt
    (dict(D=False, z=True, bias=False), True, 1.0),
    (dict(D=True, z=False, bias=True), True, 1.0),
    (dict(D=True, z=True, bias=True), True, 30.0),
]


@pytest.mark.parametrize("given, softplus, scale", OPTIONAL, ids=["bare", "gate", "skip+bias", "softplus-tails"])
def test_optional_arguments(given, softplus, scale):
    b, l, d, n = 2, 37, 48, 8
    args = make_scan_inputs(7, b, l, d, n, None, **given)
    args["delta"] = scale * args["delta"] if softplus else jnp.abs(args["delta"])
    y, h = _run("cpu", args, None, 16, softplus)
    y64, h64 = selective_scan_oracle(**args, delta_softplus=softplus)
    assert rel_err(y, y64) < TOL["float32"] and rel_err(h, h64) < TOL["float32"]
    kc = jax.random.split(jax.random.key(6))
    cot_y = jax.random.normal(kc[0], (b, l, d), jnp.float32)
    cot_h = jax.random.normal(kc[1], (b, d, n), jnp.float32)
    ref = _grads("reference", args, None, cot_y, cot_h, softplus=softplus)
    out = _grads("cpu", args, None, cot_y, cot_h, 16, softplus)
    assert set(out) == set(ref) == {k for k in NAMES if k in args}
    for k in ref:
        assert rel_err(out[k], ref[k]) < GRAD_TOL["float32"], k


def test_packed_documents_drop_the_state():
    """With a boundary at every step, each step starts from zero: the output is
    the one-step scan of each time step alone."""
    b, l, d, n = 2, 9, 16, 5
    args = make_scan_inputs(3, b, l, d, n, None, h0=False)
    y, _ = _run("cpu", args, jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)))
    one = lambda t: {k: (v[:, t : t + 1] if v.ndim >= 2 and v.shape[:2] == (b, l) else v) for k, v in args.items()}
    y_alone = jnp.concatenate([selective_scan_oracle(**one(t), delta_softplus=True)[0] for t in range(l)], axis=1)
    assert rel_err(y, y_alone) < TOL["float32"]


def test_auto_on_cpu_embeds_the_kernel():
    """impl="auto" lowered for CPU: the kernel's forward (and backward under grad)
    from CPU_KERNEL_MIN_LENGTH steps on, the XLA recurrence below."""
    long = make_scan_inputs(0, 2, scan_module.CPU_KERNEL_MIN_LENGTH, 32, 16, None)
    f = lambda a: mj.ops.selective_scan(**a, delta_softplus=True, return_final_state=True)
    loss = lambda a: jnp.sum(f(a)[0])
    text = jax.jit(f).lower(long).as_text()
    assert text.count(FWD) == 1 and BWD not in text
    grad_text = jax.jit(jax.grad(loss)).lower(long).as_text()
    assert grad_text.count(FWD) == 1 and grad_text.count(BWD) == 1
    short = make_scan_inputs(0, 2, scan_module.CPU_KERNEL_MIN_LENGTH - 1, 32, 16, None)
    assert FWD not in jax.jit(f).lower(short).as_text()
    assert mj.ops.resolve_impl("cpu", 16, 4096) == "cpu"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_explicit_cpu_on_another_platform_is_an_error(platform):
    args = make_scan_inputs(0, 1, 64, 32, 16, None)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in args.items()}
    f = lambda a: mj.ops.selective_scan(**a, delta_softplus=True, impl="cpu")
    with pytest.raises(ValueError, match="runs only on CPU"):
        lowering.export_for(platform, f, shapes)
    # auto exported for that platform never holds the CPU kernel
    auto = lambda a: mj.ops.selective_scan(**a, delta_softplus=True)
    assert FWD not in lowering.export_for(platform, auto, shapes).mlir_module()


def test_without_a_compiler(monkeypatch):
    """No compiler: impl="cpu" is an error naming the reason; auto runs
    "sequential" and warns once."""
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    scan_module._cpu_kernel_unavailable.cache_clear()
    scan_module._warn_cpu_fallback.cache_clear()
    try:
        assert "no C++ compiler" in cpu.unavailable_reason()
        args = make_scan_inputs(0, 1, 64, 8, 4, None)
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            mj.ops.selective_scan(**args, impl="cpu")
        with pytest.warns(RuntimeWarning, match="runs 'sequential'"):
            assert mj.ops.resolve_impl("cpu", 16, 4096) == "sequential"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            assert mj.ops.resolve_impl("cpu", 16, 4096) == "sequential"
        text = jax.jit(lambda a: mj.ops.selective_scan(**a)).lower(args).as_text()
        assert FWD not in text
    finally:
        monkeypatch.undo()
        scan_module._cpu_kernel_unavailable.cache_clear()
        scan_module._warn_cpu_fallback.cache_clear()


def test_build_failure_shows_the_compiler_error(monkeypatch, tmp_path):
    bad = tmp_path / "cpu_scan.cc"
    bad.write_text("int main( { this_is_not_cpp; }\n")
    monkeypatch.setattr(cpu, "SOURCE", bad)
    monkeypatch.setenv("MAMBA_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="(?s)building the CPU selective-scan kernel failed.*error"):
        cpu.build()
    assert not list((tmp_path / "cache" / "cpu_scan").glob("*.so")), "a failed build leaves no library"


def test_kernel_errors_name_the_argument():
    b, l, d, n = 1, 4, 8, 3
    z = lambda *s: jnp.zeros(s, jnp.float32)
    args = lambda **kw: {**dict(u=z(b, l, d), delta=z(b, l, d), A=z(d, n), B=z(b, l, 1, n), C=z(b, l, 1, n), D=None,
                                z=None, delta_bias=None, h0=z(b, d, n), keep=None), **kw}
    with pytest.raises(ValueError, match=r"delta must be float32 with shape \(1, 4, 8\)"):
        cpu.selective_scan(**args(delta=z(b, l, d + 1)), delta_softplus=True, chunk=4)
    with pytest.raises(ValueError, match=r"z must be float32 with shape \(1, 4, 8\)"):
        cpu.selective_scan(**args(z=z(b, l, d).astype(jnp.bfloat16)), delta_softplus=True, chunk=4)
    with pytest.raises(ValueError, match="chunk=0"):
        cpu.selective_scan(**args(), delta_softplus=True, chunk=0)


def test_vmap():
    args = make_scan_inputs(2, 3, 20, 16, 4, None)
    f = lambda impl: jax.vmap(lambda a: mj.ops.selective_scan(**a, delta_softplus=True, impl=impl))
    per_row = lambda a: {k: (v[:, None] if v.shape[0] == 3 else jnp.broadcast_to(v, (3, *v.shape))) for k, v in a.items()}
    assert rel_err(f("cpu")(per_row(args)), f("sequential")(per_row(args))) < TOL["float32"]


_THREADS_SCRIPT = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, "tests")
    from scan_inputs import make_scan_inputs
    import mamba_jax as mj
    args = make_scan_inputs(4, 4, 100, 96, 16, 2)
    def loss(a):
        y, h = mj.ops.selective_scan(**a, delta_softplus=True, return_final_state=True, impl="cpu", chunk_size=32)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h * h), y
    g, y = jax.jit(jax.grad(loss, has_aux=True))(args)
    np.savez(sys.argv[1], y=np.asarray(y), **{k: np.asarray(v) for k, v in g.items()})
    """
)


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and at least two CPUs")
def test_results_do_not_depend_on_the_thread_count(tmp_path):
    """The same bits on one CPU (XLA's thread pool sized to the affinity mask) and
    on all, for everything the kernel computes. The delta_bias gradient is only
    compared to float32 rounding: it used to be XLA's own sum of ddt over (b, l),
    whose bits changed with the thread count (on the "sequential" path too); the
    kernel now sums over time itself and XLA only over the batch rows."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outs = []
    for prefix, name in (([], "all"), (["taskset", "-c", "0"], "one")):
        path = tmp_path / f"{name}.npz"
        subprocess.run([*prefix, sys.executable, "-c", _THREADS_SCRIPT, str(path)], cwd=root, env=env, check=True)
        outs.append(np.load(path))
    for k in outs[0].files:
        if k == "delta_bias":
            assert rel_err(outs[0][k], outs[1][k]) < 1e-6
        else:
            np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)
