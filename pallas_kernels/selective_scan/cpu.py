"""Selective scan on CPU: one native C++ kernel (cpu_scan.cc) through XLA FFI.

XLA:CPU runs each time step of the ``lax.scan`` core as several small fusions
and every elementwise step around it (bias, softplus, skip, gate and their
gradients) as a separate pass over (b, l, d); here all of it, forward and
backward, is one loop nest in C++. It takes float32 u, delta (b, l, d) before
the bias and softplus, A (d, n), B, C (b, l, g, n), optional D (d), z (b, l, d)
and delta_bias (d), the initial state h0 (b, d, n) and the continuation mask
keep (b, l) of packed documents (or None); it returns y (b, l, d) with the skip
and gate applied and the final state (b, d, n). The casts from and to the
caller's dtypes stay in XLA.

The forward saves the state at the start of every chunk of ``chunk`` steps
(b, ceil(l / chunk), d, n): training memory O(l / chunk). The backward, chunk by
chunk in reverse, recomputes the chunk's states from its boundary state and
runs one reverse loop for every gradient of a step; the recurrence is never
inverted.

The library is built on first use with the system C++ compiler into a per-user
cache (keyed by a hash of the source, the flags and the jax version), through a
temporary file and ``os.replace``, so concurrent builds (pytest-xdist workers)
are safe. It runs only on CPU: lowering it for another platform raises.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching, mlir

SOURCE = pathlib.Path(__file__).with_name("cpu_scan.cc")
# -fopenmp-simd: the `omp simd` reductions over channels vectorise (no OpenMP runtime);
# -fno-trapping-math: the clamp in fast_exp becomes a vector min/max (the values are unchanged).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-trapping-math", "-w")
_F32 = jnp.float32


# --------------------------------------------------------------------------
# Build and registration
# --------------------------------------------------------------------------


def compiler() -> str | None:
    """The C++ compiler used to build the kernel (``$CXX``, ``c++`` or ``g++``), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unavailable_reason() -> str | None:
    """Why the CPU kernel cannot be built here, or None when it can."""
    if compiler() is None:
        return "no C++ compiler found (looked for $CXX, c++, g++)"
    if not SOURCE.exists():
        return f"the kernel source {SOURCE} is missing from the installation"
    return None


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("MAMBA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mamba_jax"
    )
    return pathlib.Path(root) / "cpu_scan"


def _cpu_features() -> bytes:
    """The CPU's feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line
    except OSError:
        pass
    return platform.machine().encode()


def build() -> pathlib.Path:
    """Compiles cpu_scan.cc (once per source, flags and jax version) and returns the library path."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build the CPU selective-scan kernel: {reason}")
    cxx = compiler()
    source = SOURCE.read_bytes()
    # -march=native: the host's instruction set is part of the key (a cache in a
    # home directory shared by different machines must not hand out the wrong one).
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), jax.__version__.encode(), cxx.encode(), _cpu_features()])
    )
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"cpu_scan_{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(
            f"building the CPU selective-scan kernel failed (exit {proc.returncode}):\n"
            f"{' '.join(cmd)}\n{proc.stderr}"
        )
    os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same bytes
    return lib


@functools.cache
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in (("mamba_selective_scan_fwd", "MambaSelectiveScanFwd"),
                           ("mamba_selective_scan_bwd", "MambaSelectiveScanBwd")):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


# A identity on one array whose lowering exists only for CPU: calling the kernel
# in a computation lowered for another platform fails here, with its reason,
# instead of producing a custom call that platform does not have.
_cpu_only_p = jax.extend.core.Primitive("mamba_cpu_selective_scan_guard")
_cpu_only_p.def_impl(lambda x: x)
_cpu_only_p.def_abstract_eval(lambda x: x)
batching.primitive_batchers[_cpu_only_p] = lambda args, dims: (_cpu_only_p.bind(args[0]), dims[0])


def _guard_lowering_error(ctx, x):
    platforms = getattr(ctx.module_context, "platforms", None)
    raise ValueError(
        "impl='cpu' (the native CPU selective-scan kernel) runs only on CPU, but the computation is "
        f"being lowered for {platforms}; use impl='auto' or an implementation for that platform"
    )


mlir.register_lowering(_cpu_only_p, _guard_lowering_error)
mlir.register_lowering(_cpu_only_p, lambda ctx, x: [x], platform="cpu")


# --------------------------------------------------------------------------
# The scan: custom_vjp with explicit _fwd / _bwd
# --------------------------------------------------------------------------


def selective_scan(u, delta, A, B, C, D, z, delta_bias, h0, keep, *, delta_softplus: bool, chunk: int):
    """``(y (b, l, d), final state (b, d, n))``, float32; see the module docstring.

    D, z and delta_bias may be None (no skip, no gate, no bias); keep is None or
    the (b, l) continuation mask of packed documents.
    """
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    for name, x, shape in (("u", u, (b, l, d)), ("delta", delta, (b, l, d)), ("A", A, (d, n)),
                           ("B", B, (b, l, g, n)), ("C", C, (b, l, g, n)), ("D", D, (d,)), ("z", z, (b, l, d)),
                           ("delta_bias", delta_bias, (d,)), ("h0", h0, (b, d, n)), ("keep", keep, (b, l))):
        if x is not None and (tuple(x.shape) != shape or x.dtype != _F32):
            raise ValueError(f"{name} must be float32 with shape {shape}, got {name}.shape={tuple(x.shape)} "
                             f"{name}.dtype={x.dtype}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{chunk=} must be a positive int")
    _register()
    return _scan(u, delta, A, B, C, D, z, delta_bias, h0, keep, bool(delta_softplus), chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11))
def _scan(u, delta, A, B, C, D, z, delta_bias, h0, keep, softplus, chunk):
    (y, hT), _ = _fwd(u, delta, A, B, C, D, z, delta_bias, h0, keep, softplus, chunk)
    return y, hT


def _kernel_args(u, D, z, delta_bias, keep):
    """The kernel's stand-ins for absent arguments: D and bias 0, a gate of size 0, keep 1."""
    b, l, d = u.shape
    return (jnp.zeros((d,), _F32) if D is None else D,
            jnp.zeros((0,), _F32) if z is None else z,
            jnp.zeros((d,), _F32) if delta_bias is None else delta_bias,
            jnp.ones((b, l), _F32) if keep is None else keep)


def _fwd(u, delta, A, B, C, D, z, delta_bias, h0, keep, softplus, chunk):
    b, l, d = u.shape
    n = A.shape[1]
    D_, z_, bias_, keep_ = _kernel_args(u, D, z, delta_bias, keep)
    out_types = (
        jax.ShapeDtypeStruct((b, l, d), _F32),
        jax.ShapeDtypeStruct((b, d, n), _F32),
        jax.ShapeDtypeStruct((b, -(-l // chunk), d, n), _F32),
    )
    call = jax.ffi.ffi_call("mamba_selective_scan_fwd", out_types, vmap_method="sequential")
    y, hT, starts = call(_cpu_only_p.bind(u), delta, bias_, A, B, C, D_, z_, h0, keep_,
                         chunk=np.int64(chunk), softplus=np.int64(softplus))
    return (y, hT), (u, delta, A, B, C, D, z, delta_bias, keep, starts)


def _bwd(softplus, chunk, res, cotangents):
    u, delta, A, B, C, D, z, delta_bias, keep, starts = res
    dy, dhT = cotangents
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    D_, z_, bias_, keep_ = _kernel_args(u, D, z, delta_bias, keep)
    out_types = (
        jax.ShapeDtypeStruct((b, l, d), _F32),  # du
        jax.ShapeDtypeStruct((b, l, d), _F32),  # ddelta
        jax.ShapeDtypeStruct(z_.shape, _F32),  # dz
        jax.ShapeDtypeStruct((b, d, n), _F32),  # dA per batch row
        jax.ShapeDtypeStruct((b, l, g, n), _F32),  # dB
        jax.ShapeDtypeStruct((b, l, g, n), _F32),  # dC
        jax.ShapeDtypeStruct((b, d, n), _F32),  # dh0
        jax.ShapeDtypeStruct((b, d), _F32),  # dD per batch row
        jax.ShapeDtypeStruct((b, d), _F32),  # dbias per batch row
    )
    call = jax.ffi.ffi_call("mamba_selective_scan_bwd", out_types, vmap_method="sequential")
    du, ddelta, dz, dA, dB, dC, dh0, dD, dbias = call(
        u, delta, bias_, A, B, C, D_, z_, keep_, starts, dy.astype(_F32), dhT.astype(_F32),
        chunk=np.int64(chunk), softplus=np.int64(softplus),
    )
    # Sums over batch rows in a fixed order, whatever the number of threads.
    dA, dD, dbias = jnp.sum(dA, axis=0), jnp.sum(dD, axis=0), jnp.sum(dbias, axis=0)
    return (du, ddelta, dA, dB, dC,
            None if D is None else dD,
            None if z is None else dz,
            None if delta_bias is None else dbias,
            dh0,
            None if keep is None else jnp.zeros_like(keep))  # a mask of document ids: no gradient


_scan.defvjp(_fwd, _bwd)
