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


def environment() -> dict:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
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
