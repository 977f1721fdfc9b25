"""Conventions shared by the numbered experiments (not library logic).

Every experiment takes ``--quick`` (a CI smoke run of seconds), ``--out`` (where the
JSON and PNG go; default ``experiments/results``, or a temporary directory with ``--quick``) and ``--workdir`` (metrics.jsonl and
checkpoints of each training run; a rerun resumes from there). Results are written
with :func:`write_results`, which adds the environment (versions, CPU, device), and
:func:`save_figure`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def parse_args(name: str, description: str | None = None, extra=None) -> argparse.Namespace:
    """``--quick``, ``--out``, ``--workdir`` (default ``runs/<name>``, or a fresh
    temporary one in quick mode), plus whatever ``extra(parser)`` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (CI)")
    parser.add_argument("--out", default=None,
                        help="directory for the JSON and PNG results (default experiments/results; with --quick a temporary one)")
    parser.add_argument("--workdir", default=None, help="training runs' metrics and checkpoints (resumed if present)")
    if extra is not None:
        extra(parser)
    args, _ = parser.parse_known_args()  # notebooks (jupytext) pass their own arguments
    if args.out is None:  # a --quick run never overwrites the committed results
        import tempfile

        args.out = tempfile.mkdtemp(prefix=f"{name}_quick_results_") if args.quick else str(RESULTS)
    if args.workdir is None:
        if args.quick:
            import tempfile

            args.workdir = tempfile.mkdtemp(prefix=f"{name}_quick_")
        else:
            args.workdir = str(ROOT / "runs" / name)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def fact_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the states experiments (06-08) that share one trained fact-task model."""
    parser.add_argument("--model-dir", default=None, help="the fact model's run (default runs/states_fact_model)")
    parser.add_argument("--load-only", action="store_true", help="use a checkpoint as it is, without training further")
    parser.add_argument("--model-step", type=int, default=None, help="with --load-only: this step (default: the latest)")


def fact_model(args: argparse.Namespace, task):
    """``(task, model, step)``: the states experiments' fact-task model, trained (resuming
    from its checkpoints) or, with ``--load-only``, loaded as it is; ``--quick`` swaps in the
    tiny task of ``FactTaskConfig.quick()`` trained in the run's temporary workdir."""
    from mamba_jax.states import facts

    if args.quick:
        task = facts.FactTaskConfig.quick()
    model_dir = args.model_dir or (Path(args.workdir) / "model" if args.quick else ROOT / "runs" / "states_fact_model")
    if args.load_only:
        model, step = facts.load_fact_model(task, model_dir, args.model_step)
    else:
        model, step = facts.train_fact_model(task, model_dir, progress=False), task.steps
    return task, model, step


def environment() -> dict:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(args: argparse.Namespace, name: str, results: dict) -> Path:
    """Writes ``<out>/<name>.json`` (``quick`` and the environment added) and returns its path."""
    path = Path(args.out) / f"{name}.json"
    payload = {"experiment": name, "quick": bool(args.quick), "environment": environment(), **results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def save_figure(args: argparse.Namespace, name: str, fig) -> Path:
    """Writes ``<out>/<name>.png`` (tight layout, 120 dpi) and returns its path."""
    path = Path(args.out) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path


def best_of(fn, repeats: int) -> float:
    """The shortest of ``repeats`` wall times of ``fn()``, in seconds (no warm-up call)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ceilings(matmul_n: int = 2048, copy_bytes: int = 1 << 28, repeats: int = 5) -> dict:
    """The two ceilings every benchmark here divides by, measured now, on this device.

    * ``matmul_flops_per_s``: a float32 ``matmul_n``^3 product jitted with XLA,
      ``2 n^3`` FLOPs over the best of ``repeats``.
    * ``copy_bytes_per_s``: a large copy, bytes read + written per second: an
      XLA ``x + 1`` over ``copy_bytes`` with the input donated (read once, written
      in place, no fresh pages to fault in), and on CPU also NumPy's ``copyto``;
      the faster of the two (the stricter ceiling) is ``copy_bytes_per_s``.

    Call it at the start and the end of a run on a shared machine and keep the
    higher figures (see :func:`best_ceilings`).
    """
    import numpy as np
    import jax.numpy as jnp

    def best(fn):
        fn()  # compile / fault pages in
        return best_of(fn, repeats)

    a = jax.random.normal(jax.random.key(0), (matmul_n, matmul_n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    flops = 2 * matmul_n**3 / best(lambda: mm(a).block_until_ready())
    del a

    x = jnp.ones((copy_bytes // 4,), jnp.float32)
    inc = jax.jit(lambda x: x + jnp.ones((), x.dtype), donate_argnums=0)
    holder = [inc(x)]

    def xla_copy():
        holder[0] = inc(holder[0]).block_until_ready()

    copies = {"xla_donated": 2 * copy_bytes / best(xla_copy)}
    del holder, x
    if jax.default_backend() == "cpu":
        src = np.ones(copy_bytes // 4, np.float32)
        dst = np.empty_like(src)
        copies["numpy_copyto"] = 2 * copy_bytes / best(lambda: np.copyto(dst, src))
        del src, dst
    return {
        "matmul_flops_per_s": flops,
        "copy_bytes_per_s": max(copies.values()),
        "copy_bytes_per_s_by_method": copies,
        "matmul_n": matmul_n,
        "copy_bytes": copy_bytes,
        "repeats": repeats,
    }


def best_ceilings(*measured: dict) -> dict:
    """The highest of several :func:`ceilings` measurements (the strictest ceilings),
    with every measurement kept under ``measurements``."""
    out = dict(max(measured, key=lambda c: c["matmul_flops_per_s"]))
    out["copy_bytes_per_s"] = max(c["copy_bytes_per_s"] for c in measured)
    out["measurements"] = list(measured)
    return out
