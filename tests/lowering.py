"""Lower a function for TPU or GPU from this CPU-only host, on jax 0.10 and 0.12.

``export_for(platform, fn, *args)`` is ``jax.export.export(jax.jit(fn),
platforms=[platform])(*args)`` with what each jax version needs to make that
work without the hardware:

* **GPU (``cuda``/``rocm``).** jax 0.12's Pallas Triton lowering asks for the
  GPU's compute capability and, on a host with no GPU, fails with "No supported
  GPU devices found, please specify an abstract GPU device using
  AbstractDevice". The answer is an *abstract device* carried by an (empty)
  abstract mesh; the lowering rules read it through
  ``jax.sharding.get_abstract_mesh().abstract_device``::

      from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
      dev = AbstractDevice(device_kind="NVIDIA A100-SXM4-40GB", num_cores=None, platform="cuda")
      with use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)):
          exp = jax.export.export(jax.jit(f), platforms=["cuda"])(*shapes)

  The device kind picks the target: any name containing one of jax's known
  GPUs (``Tesla T4``, ``NVIDIA A100``, ``NVIDIA L4``, ``NVIDIA H100``,
  ``NVIDIA H200``, ``NVIDIA B200``, ...; see ``jax._src.pallas.triton.gpu_info``)
  gives that GPU's compute capability. An axis-less mesh changes nothing else
  (``mesh.empty`` stays true). jax 0.10.2 lowers without it and accepts it too,
  so it is always used for GPU platforms.
* **TPU.** ``jax.export`` lowers Mosaic kernels without libtpu; it does not run
  the Mosaic compiler (for that, compile against a TPU topology: see
  "Verifying TPU kernels without a TPU" in the design notes).
* **Custom calls.** ``jax.export`` refuses custom calls it does not know to be
  stable; the kernels' calls (``CUSTOM_CALLS``) are allowed explicitly.

The exported module's text (``exp.mlir_module()``) can be searched for the
kernel's custom call, e.g. ``"__gpu$xla.gpu.triton" in exp.mlir_module()``;
``custom_call_targets(exp)`` counts every custom call target in it.

Pallas back ends on GPU, as of jax 0.12: ``pl.pallas_call`` lowers for GPU
through **Triton** only (default, or ``plt.CompilerParams``), and every such
lowering warns (``DeprecationWarning``, deprecation id ``jax-pallas-triton``):
"The Pallas Triton backend is deprecated and will be removed in a future JAX
version. To keep using Pallas on GPU, please migrate to the Mosaic GPU backend.
To keep using Triton, switch to the official Triton bindings and jax_triton."
``export_for`` silences exactly that message unless ``warn_triton=True``.
**Mosaic GPU** kernels are written with ``plgpu.kernel`` (``out_type=``;
``pl.pallas_call`` with ``plgpu.CompilerParams`` fails to lower on 0.12 with a
bare ``AssertionError``, and on 0.10.2 warns that it is deprecated); they lower
for ``cuda`` from this host on 0.10.2 and 0.12, with or without an abstract
device, to the custom call ``mosaic_gpu_v2``. Lowering does not check the GPU
generation: that Mosaic GPU needs Hopper or newer shows only when compiling.
"""

from __future__ import annotations

import collections
import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax import export

# The custom call each kind of kernel lowers to.
CUSTOM_CALLS = {
    "tpu": "tpu_custom_call",  # Pallas Mosaic (TPU)
    "triton": "__gpu$xla.gpu.triton",  # Pallas Triton (cuda, rocm)
    "mosaic_gpu": "mosaic_gpu_v2",  # Pallas Mosaic GPU (cuda, Hopper and newer)
    "cpu_fwd": "mamba_selective_scan_fwd",  # the native CPU selective scan (XLA FFI), forward
    "cpu_bwd": "mamba_selective_scan_bwd",  # and backward
}

# Device kinds as jax reports them (``jax.devices()[0].device_kind``).
T4 = "Tesla T4"  # compute capability 7.5 (Colab's free GPU)
A100 = "NVIDIA A100-SXM4-40GB"  # 8.0
L4 = "NVIDIA L4"  # 8.9
H100 = "NVIDIA H100 80GB HBM3"  # 9.0 (Hopper)
DEFAULT_DEVICE_KIND = {"cuda": A100, "rocm": "gfx90a"}

GPU_PLATFORMS = ("cuda", "rocm")
_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


@contextlib.contextmanager
def abstract_gpu(device_kind: str | None = None, platform: str = "cuda") -> Iterator[None]:
    """Within this context, lowering for GPU targets ``device_kind`` (default: an A100).

    Sets an axis-less abstract mesh that carries a ``jax.sharding.AbstractDevice``.
    On a jax without ``AbstractDevice`` it does nothing.
    """
    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    if abstract_device is None:
        yield
        return
    kind = device_kind or DEFAULT_DEVICE_KIND[platform]
    device = abstract_device(device_kind=kind, num_cores=None, platform=platform)
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def export_for(
    platform: str | Sequence[str],
    fn: Callable[..., Any],
    *args: Any,
    device_kind: str | None = None,
    warn_triton: bool = False,
    **kwargs: Any,
) -> export.Exported:
    """Export ``jax.jit(fn)`` for ``platform`` ("tpu", "cuda", "rocm", "cpu" or a
    sequence of them) at ``args`` (arrays or ``jax.ShapeDtypeStruct`` pytrees).

    ``kwargs`` go to ``fn`` as static (closed-over) values. For GPU platforms the
    lowering targets ``device_kind`` (see ``abstract_gpu``). Returns the
    ``jax.export.Exported``; ``.mlir_module()`` is its text, ``.out_avals`` its
    output shapes.
    """
    platforms = (platform,) if isinstance(platform, str) else tuple(platform)
    gpus = [p for p in platforms if p in GPU_PLATFORMS]
    target = jax.jit(lambda *a: fn(*a, **kwargs)) if kwargs else jax.jit(fn)
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in CUSTOM_CALLS.values()]
    ctx = abstract_gpu(device_kind, gpus[0]) if gpus else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        if not warn_triton:
            warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)
        return export.export(target, platforms=platforms, disabled_checks=checks)(*args)


def custom_call_targets(exported: export.Exported | str) -> collections.Counter[str]:
    """How many times each custom call target occurs in an exported module (or its text)."""
    text = exported if isinstance(exported, str) else exported.mlir_module()
    names = re.findall(r'stablehlo\.custom_call @([\w$.]+)|call_target_name = "([^"]+)"', text)
    return collections.Counter(a or b for a, b in names)
