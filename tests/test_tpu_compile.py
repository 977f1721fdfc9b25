"""The selective scan compiled (not only lowered) for real TPU topologies.

Each topology compiles the grid of ``experiments/tpu_compile.py`` (forward and
gradient of ``selective_scan(impl="auto")`` at the presets' widths, n = 16, 64,
128, bf16 and f32, groups, unaligned lengths) in its own process, so libtpu
never loads into the test process and two topologies can compile at once.
Needs libtpu (the ``tpu`` extra, which ``make test`` installs): without it the
tests skip with the reason, except under CI, where its absence is a failure.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mamba_jax as mj

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import tpu_compile  # noqa: E402


def _require_libtpu():
    if importlib.util.find_spec("libtpu") is None:
        reason = "libtpu is not installed (pip install -e '.[tpu]'): TPU compile checks not run"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.parametrize("topology", tpu_compile.TOPOLOGIES)
def test_compiles_for_topology(topology, tmp_path):
    _require_libtpu()
    out = tmp_path / "compile.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tpu_compile.py"), "--topology", topology, "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == sum(len(c[-1]) for c in tpu_compile.CASES)
    failed = [(r["case"], r["pass_"], r.get("error")) for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:  # auto embedded the kernel: once in the forward, twice with the backward
        assert r["kernel_calls"] == (1 if r["pass_"] == "fwd" else 2), r
        assert r["vmem_estimate_bytes"] <= r["vmem_limit_bytes"], r


def test_grid_covers_what_auto_picks():
    """impl="auto" picks the kernel on TPU only at state sizes this grid compiles
    in both passes, at every preset width."""
    grad_sizes = {c[4] for c in tpu_compile.CASES if "grad" in c[-1]}
    fwd_sizes = {c[4] for c in tpu_compile.CASES if "fwd" in c[-1]}
    verified = set(mj.ops.VERIFIED_STATE_SIZES["tpu"])
    assert verified <= grad_sizes and verified <= fwd_sizes
    widths = {c[3] for c in tpu_compile.CASES}
    presets = [mj.MambaConfig.mamba_130m, mj.MambaConfig.mamba_370m, mj.MambaConfig.mamba_790m,
               mj.MambaConfig.mamba_1_4b, mj.MambaConfig.mamba_2_8b]
    assert {p().d_inner for p in presets} <= widths
    for n in range(1, 200):
        expected = "pallas" if n in verified else "chunked"
        assert mj.ops.resolve_impl("tpu", n, 2048) == expected
