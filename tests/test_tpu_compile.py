"""The selective scan and the SSD compiled (not only lowered) for real TPU topologies.

Each topology compiles the grid of ``experiments/tpu_compile.py`` (forward and
gradient of ``selective_scan(impl="auto")`` at the presets' widths, n = 16, 64,
128, bf16 and f32, groups, unaligned lengths) in its own process, so libtpu
never loads into the test process and two topologies can compile at once.
The SSD (``experiments/tpu_compile_ssd.py``) compiles its CI subset (n = 64
and 128, 1 and 8 groups, l = 4096, 2000 with packed documents and a dt clamp,
and 100, one chunk; bf16) per topology the same way.
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
import tpu_compile_ssd  # noqa: E402


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


# --------------------------------------------------------------------------- SSD (Mamba-2)

@pytest.mark.parametrize("topology", tpu_compile_ssd.TOPOLOGIES)
def test_ssd_compiles_for_topology(topology, tmp_path):
    """ssd(impl="auto"), forward and gradient, compiles at the CI subset of
    experiments/tpu_compile_ssd.py and embeds the Mosaic SSD kernels."""
    _require_libtpu()
    out = tmp_path / "compile_ssd.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tpu_compile_ssd.py"), "--topology", topology, "--ci",
         "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    ci = [c for c in tpu_compile_ssd.CASES if c[0] in tpu_compile_ssd.CI_CASES]
    assert len(rows) == sum(len(c[7]) for c in ci)
    failed = [(r["case"], r["pass_"], r.get("error")) for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:  # auto chose and embedded the kernel: once in the forward, twice with the backward
        assert r["auto"] == "pallas", r
        assert r["kernel_calls"] == (1 if r["pass_"] == "fwd" else 2), r
        assert r["ssd_kernels"] == (["ssd_fwd_tpu"] if r["pass_"] == "fwd" else ["ssd_fwd_tpu", "ssd_bwd_tpu"]), r
        assert r["vmem_estimate_bytes"] <= r["vmem_limit_bytes"], r


def test_ssd_grid_covers_what_auto_picks():
    """impl="auto" picks the SSD kernel on TPU only at shapes the grid compiles in
    both passes (and the CI subset compiles every verified state size in both)."""
    from mamba_jax.ops.ssd import VERIFIED_SSD

    verified = VERIFIED_SSD["tpu"]
    for cases in (tpu_compile_ssd.CASES, [c for c in tpu_compile_ssd.CASES if c[0] in tpu_compile_ssd.CI_CASES]):
        for pass_ in ("fwd", "grad"):
            sizes = {c[4] for c in cases if pass_ in c[7]}
            assert set(verified["state_sizes"]) <= sizes, (pass_, sizes)
    assert set(verified["headdims"]) == {tpu_compile_ssd.P}
    assert set(verified["chunk_sizes"]) == {tpu_compile_ssd.CHUNK}
    for n in range(1, 200):
        expected = "pallas" if n in verified["state_sizes"] else "chunked"
        assert mj.ops.resolve_ssd_impl("tpu", n, 2048, headdim=64, chunk_size=256) == expected
