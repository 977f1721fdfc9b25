"""Selective scan core on CPU: one native C++ kernel (cpu_scan.cc) through XLA FFI.

XLA:CPU runs each time step of the ``lax.scan`` core as several small fusions;
here the whole core, forward and backward, is one loop nest in C++. The core
is what ``prepare`` (pallas_kernels/selective_scan/reference.py) hands over:
float32 u, dt (b, l, d) with the bias and softplus applied, A (d, n), B, C
(b, l, g, n), h0 (b, d, n) and the continuation mask keep (b, l) of packed
documents (or None); it returns y (b, l, d) before D and the gate, and the final
state (b, d, n). ``finish`` stays in XLA.

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
BLOCK_CHANNELS = 32  # kBlock in cpu_scan.cc: channels per work item (dB, dC come back per block)
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
# The core: custom_vjp with explicit _fwd / _bwd
# --------------------------------------------------------------------------


def selective_scan_core(u, dt, A, B, C, h0, keep, chunk: int):
    """``(y (b, l, d), final state (b, d, n))``, float32; see the module docstring."""
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    for name, x, shape in (("u", u, (b, l, d)), ("dt", dt, (b, l, d)), ("A", A, (d, n)),
                           ("B", B, (b, l, g, n)), ("C", C, (b, l, g, n)), ("h0", h0, (b, d, n))):
        if tuple(x.shape) != shape or x.dtype != _F32:
            raise ValueError(f"{name} must be float32 with shape {shape}, got {name}.shape={tuple(x.shape)} "
                             f"{name}.dtype={x.dtype}")
    if keep is not None and (tuple(keep.shape) != (b, l) or keep.dtype != _F32):
        raise ValueError(f"keep must be float32 with shape (b, l)={(b, l)}, got {keep.shape} {keep.dtype}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{chunk=} must be a positive int")
    _register()
    return _core(u, dt, A, B, C, h0, keep, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _core(u, dt, A, B, C, h0, keep, chunk):
    (y, hT), _ = _fwd(u, dt, A, B, C, h0, keep, chunk)
    return y, hT


def _fwd(u, dt, A, B, C, h0, keep, chunk):
    b, l, d = u.shape
    n = A.shape[1]
    keep_arr = jnp.ones((b, l), _F32) if keep is None else keep
    out_types = (
        jax.ShapeDtypeStruct((b, l, d), _F32),
        jax.ShapeDtypeStruct((b, d, n), _F32),
        jax.ShapeDtypeStruct((b, -(-l // chunk), d, n), _F32),
    )
    call = jax.ffi.ffi_call("mamba_selective_scan_fwd", out_types, vmap_method="sequential")
    y, hT, starts = call(_cpu_only_p.bind(u), dt, A, B, C, h0, keep_arr, chunk=np.int64(chunk))
    return (y, hT), (u, dt, A, B, C, keep_arr, starts, keep)


def _bwd(chunk, res, cotangents):
    u, dt, A, B, C, keep_arr, starts, keep = res
    dy, dhT = cotangents
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    blocks = -(-(d // g) // BLOCK_CHANNELS)
    out_types = (
        jax.ShapeDtypeStruct((b, l, d), _F32),  # du
        jax.ShapeDtypeStruct((b, l, d), _F32),  # ddt
        jax.ShapeDtypeStruct((b, d, n), _F32),  # dA per batch row
        jax.ShapeDtypeStruct((blocks, b, l, g, n), _F32),  # dB per channel block
        jax.ShapeDtypeStruct((blocks, b, l, g, n), _F32),  # dC per channel block
        jax.ShapeDtypeStruct((b, d, n), _F32),  # dh0
    )
    call = jax.ffi.ffi_call("mamba_selective_scan_bwd", out_types, vmap_method="sequential")
    du, ddt, dA, dB, dC, dh0 = call(
        u, dt, A, B, C, keep_arr, starts, dy.astype(_F32), dhT.astype(_F32), chunk=np.int64(chunk)
    )
    # Partial sums added in a fixed order, whatever the number of threads.
    dA, dB, dC = jnp.sum(dA, axis=0), jnp.sum(dB, axis=0), jnp.sum(dC, axis=0)
    dkeep = None if keep is None else jnp.zeros_like(keep)  # a mask of document ids: no gradient
    return du, ddt, dA, dB, dC, dh0, dkeep


_core.defvjp(_fwd, _bwd)
