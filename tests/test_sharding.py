"""Sharded models on 8 forced CPU devices (in a subprocess: the device count is
fixed when jax starts) against the single-device run, plus the API's errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mamba_jax as mj
from mamba_jax import sharding as mjs

SCRIPT = Path(__file__).with_name("sharded_check.py")
TOL = 1e-5  # float32: the same computation, partitioned (reductions in another order)


def _run(*flags):
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(rows):
    scans = [r for r in rows if "scan" in r]
    assert {r["scan"] for r in scans} == {"sequential", "pallas"}, scans
    for r in scans:  # shard_map'd scan (the Pallas kernel interpreted) vs the unsharded reference
        assert r["out_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    rows = [r for r in rows if "scan" not in r]
    assert rows
    for r in rows:
        assert r["init_err"] < TOL and r["loss_err"] < TOL and r["grad_norm_err"] < TOL, r
        assert r["param_err"] < 10 * TOL, r  # after one AdamW step (division by sqrt(v))
        assert r["split"], r  # fsdp/tensor axes really split the parameters
        assert r["opt_like_params"], r  # optimizer moments sharded like their parameters


def test_layouts_match_single_device_quick():
    rows = _run("--quick")
    assert {(r["model"], r["layout"]) for r in rows if "model" in r} == {
        ("mamba", "data2_fsdp2_tensor2"), ("mamba", "fsdp2_tensor2_sequence2"), ("hybrid", "data2_fsdp2_tensor2")
    }
    _check(rows)


@pytest.mark.slow
def test_every_layout_matches_single_device():
    _check(_run())


def test_make_mesh_and_errors():
    n = len(jax.devices())
    mesh = mjs.make_mesh(data=-1)
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1, "sequence": 1}
    with pytest.raises(ValueError, match="needs 2 devices"):
        mjs.make_mesh(data=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        mjs.make_mesh(data=-1, tensor=-1)
    with pytest.raises(ValueError, match="tensor=0"):
        mjs.make_mesh(tensor=0)
    fake = [jax.devices()[0]] * 4  # shapes only: divisibility is checked before placement
    model = mj.MambaLM(mj.MambaConfig(d_model=3, n_layer=1, vocab_size=16), rngs=nnx.Rngs(0))  # d_inner 6
    with pytest.raises(ValueError, match=r"parameter .*\(6\) is not divisible by mesh axis 'tensor' of size 4"):
        mjs.shardings(nnx.state(model), mjs.make_mesh(tensor=4, devices=fake))
    with pytest.raises(ValueError, match="batch\\['inputs'\\] has shape \\(3, 4\\)"):
        mjs.shard_batch({"inputs": jnp.zeros((3, 4), jnp.int32)}, mjs.make_mesh(data=2, devices=fake[:2]))
    with pytest.raises(ValueError, match="logical axis 'embed' has no rule"):
        mjs._mesh_spec(jax.sharding.PartitionSpec("embed"), {})
