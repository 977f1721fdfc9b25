"""Every numbered experiment runs end to end in its ``--quick`` mode (the CI smoke run)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("0[1-9]_*.py"))


@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_quick(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--workdir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert results, "the experiment wrote no JSON"
    for path in results:
        payload = json.loads(path.read_text())
        assert payload["quick"] is True
    assert list(tmp_path.glob("*.png")), "the experiment wrote no plot"


def test_quick_never_writes_into_committed_results(monkeypatch):
    """Without --out, a --quick run of a numbered experiment writes to a temporary directory;
    a full run to results/. (The bench_*.py scripts apply the same rule to their own --out.)"""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import _common

    monkeypatch.setattr(sys, "argv", ["x", "--quick"])
    quick = _common.parse_args("x")
    assert pathlib.Path(quick.out).resolve() != _common.RESULTS.resolve()
    monkeypatch.setattr(sys, "argv", ["x"])
    assert pathlib.Path(_common.parse_args("x").out).resolve() == _common.RESULTS.resolve()
