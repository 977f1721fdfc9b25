"""``python -m mamba_jax.train_lm``: 2 processes x 4 CPU devices joined over localhost
(``jax.distributed``) train on the same global batches as 1 process x 8 devices and give
the same losses; the data of a row depends on (seed, step, row) only; flag errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mamba_jax import train_lm

TOL = 1e-5  # float32: the same partitioned program, collectives over gloo instead of in-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, text: Path, devices: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [
        sys.executable, "-m", "mamba_jax.train_lm", "--preset", "tiny", "--d-model", "32", "--n-layer", "1",
        "--data", str(text), "--mesh", "data=2,fsdp=4", "--steps", "3", "--batch-size", "8", "--seq-len", "16",
        "--seed", "3", "--out", str(out), "--log-every", "1", "--warmup-steps", "1", *extra,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_two_processes_match_one(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(Path(json.__file__).read_bytes() * 4)
    port = _free_port()
    procs = [_launch(tmp_path / "one", text, 8)] + [
        _launch(tmp_path / "two", text, 4, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                "--process-id", str(i))
        for i in range(2)
    ]
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-4000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    errs = {s: abs(one[s] - two[s]) / abs(one[s]) for s in one}
    print("2x4 vs 1x8 relative loss differences:", errs)
    assert max(errs.values()) < TOL, (one, two)
    assert len(set(one.values())) == 3  # the model trains: three different losses
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["process_count"] == 2 and run["device_count"] == 8 and run["mesh"]["fsdp"] == 4


def test_rows_do_not_depend_on_the_split(tmp_path):
    args = train_lm.build_parser().parse_args(
        ["--data", "induction_heads", "--steps", "1", "--batch-size", "8", "--seq-len", "32", "--out", str(tmp_path)]
    )
    synthetic = train_lm.make_data(args)
    tokens = np.arange(1000, dtype=np.int64) % 97
    np.save(tmp_path / "t.npy", tokens)
    args.data = str(tmp_path / "t.npy")
    stream = train_lm.make_data(args)
    assert stream.vocab_size == 97
    for data in (synthetic, stream):
        whole = data.rows(5, range(0, 8))
        halves = [data.rows(5, range(0, 4)), data.rows(5, range(4, 8))]
        for k in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
        assert not np.array_equal(whole["inputs"], data.rows(6, range(0, 8))["inputs"])  # steps differ
        assert whole["inputs"].shape == (8, 32)


def test_flag_errors(tmp_path):
    assert train_lm.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        train_lm.parse_mesh("model=2")
    with pytest.raises(ValueError, match="is not an int"):
        train_lm.parse_mesh("data=two")
    args = train_lm.build_parser().parse_args(
        ["--data", str(tmp_path / "missing.txt"), "--steps", "1", "--batch-size", "8", "--seq-len", "8", "--out", "x"]
    )
    with pytest.raises(ValueError, match="neither one of"):
        train_lm.make_data(args)
    args.preset = "mamba_9b"
    with pytest.raises(ValueError, match="is not one of"):
        train_lm.make_config(args, 256)
    args.coordinator = "localhost:1"
    with pytest.raises(ValueError, match="go together"):
        train_lm.init_distributed(args)
    np.save(tmp_path / "f.npy", np.zeros(100, np.float32))
    args.data = str(tmp_path / "f.npy")
    with pytest.raises(ValueError, match="integer token ids"):
        train_lm.make_data(args)


@pytest.mark.slow
def test_multiprocess_checkpoint_resumes_in_one_process(tmp_path):
    """2 processes x 4 devices save checkpoints (each process its shards); the step-2
    checkpoint resumes in 1 process x 8 devices on another mesh with the same losses."""
    text = tmp_path / "text.txt"
    text.write_bytes(Path(json.__file__).read_bytes() * 4)
    port = _free_port()
    procs = [
        _launch(tmp_path / "run", text, 4, "--checkpoint-every", "2", "--steps", "4", "--coordinator",
                f"localhost:{port}", "--num-processes", "2", "--process-id", str(i))
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
    two = _losses(tmp_path / "run")
    assert sorted(two) == [1, 2, 3, 4]
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    one = _launch(tmp_path / "run", text, 8, "--checkpoint-every", "2", "--steps", "4", "--mesh", "fsdp=8")
    _, err = one.communicate(timeout=900)
    assert one.returncode == 0, err[-4000:]
    resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == [1, 2, 3, 4]
    errs = [abs(resumed[s] - two[s]) / abs(two[s]) for s in (3, 4)]
    print("resumed in 1 process x fsdp8 vs 2 processes x (data2, fsdp4), steps 3-4:", errs)
    assert max(errs) < TOL, (two, resumed)
