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
TRAINER_SCRIPT = Path(__file__).with_name("sharded_trainer_check.py")
TOL = 1e-5  # float32: the same computation, partitioned (reductions in another order)


def _run(*flags, script=SCRIPT):
    proc = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(rows):
    scans = [r for r in rows if "scan" in r]
    assert {r["scan"] for r in scans} == {"sequential", "cpu", "pallas", "ssd_chunked", "ssd_pallas", "conv_halo"}, scans
    for r in scans:  # shard_map'd scan (the Pallas kernel interpreted) vs the unsharded reference
        assert r["out_err"] < 1e-5 and r["grad_err"] < 1e-5, r
        assert r.get("shard_map", True), r  # ssd rows: in shard_map; conv rows: the halo through a collective permute
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
        ("mamba", "data2_fsdp2_tensor2"), ("mamba", "fsdp2_tensor2_sequence2"), ("hybrid", "data2_fsdp2_tensor2"),
        ("mamba2", "fsdp2_tensor2_sequence2"),
    }
    _check(rows)


@pytest.mark.slow
def test_every_layout_matches_single_device():
    _check(_run())


def test_trainer_on_a_mesh_and_restore_onto_another():
    """Trainer(mesh=fsdp8) losses and parameters equal the single-device Trainer's; its
    step-2 checkpoint restored onto data2 x tensor4 continues with the same losses."""
    rows = {r["check"]: r for r in _run(script=TRAINER_SCRIPT)}
    fsdp, restore = rows["trainer"], rows["restore"]
    assert fsdp["steps"] == [1, 2, 3, 4] and fsdp["loss_err"] < TOL and fsdp["param_err"] < 10 * TOL, fsdp
    assert fsdp["shard_shape"] == [4, 128] and fsdp["full_shape"] == [32, 128], fsdp  # split 8-way over fsdp
    assert fsdp["moment_like_param"], fsdp
    assert restore["resumed_steps"] == [3, 4] and restore["metric_steps"] == [1, 2, 3, 4], restore
    assert restore["loss_err"] < TOL and restore["param_err"] < 10 * TOL, restore
    assert restore["shard_shape"] == [32, 32], restore  # read into the new layout: tensor 4-way, fsdp 1
    loaded = rows["from_pretrained"]  # from_pretrained(mesh=) places each parameter as shard_model does
    assert loaded["value_err"] == 0.0 and loaded["same_shardings"], loaded
    assert loaded["shard_shape"] == [16, 32] and loaded["full_shape"] == [32, 128], loaded


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


@pytest.mark.parametrize("layer", ["mamba1", "mamba2"])
def test_scan_layers_and_remat_match_the_loop(layer):
    """MambaConfig(scan_layers=True) / remat: the same loss and gradients as the plain
    loop over blocks (the same parameters; only the program differs)."""
    kw = dict(d_model=32, n_layer=3, vocab_size=64, d_intermediate=48)
    if layer == "mamba2":
        kw.update(layer="mamba2", d_state=16, headdim=16, chunk_size=8)
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)

    def loss_and_grads(**extra):
        model = mj.MambaLM(mj.MambaConfig(**kw, **extra), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            logits = nnx.merge(graphdef, p)(ids[:, :-1])
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * logits[..., 1])

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads()
    for extra in (dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")):
        loss, grads = loss_and_grads(**extra)
        assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss)), extra
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            err = float(jnp.linalg.norm(g - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30))
            assert err < 1e-5, (extra, err)


def test_scan_layers_and_remat_errors():
    with pytest.raises(ValueError, match="mixes attention and Mamba layers"):
        mj.MambaConfig(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=(1,), scan_layers=True)
    with pytest.raises(ValueError, match="remat='some'"):
        mj.MambaConfig(d_model=32, n_layer=2, vocab_size=64, remat="some")
    with pytest.raises(ValueError, match="scan_layers=1"):
        mj.MambaConfig(d_model=32, n_layer=2, vocab_size=64, scan_layers=1)


@pytest.mark.slow
def test_aot_pod_quick_compiles_for_tpu(tmp_path):
    """experiments/aot_pod.py --quick: the sharded train step (scan_layers + remat, fsdp4) of a
    tiny model compiles with libtpu for v5e:2x2 and reports memory and kernel calls."""
    pytest.importorskip("libtpu", reason="libtpu (the tpu extra) is not installed")
    out = tmp_path / "aot.json"
    script = Path(__file__).parents[1] / "experiments" / "aot_pod.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())["tpu_rows"]
    assert row["ok"], row
    assert row["kernel_calls"] >= 2 and row["total_bytes"] > 0 and row["mesh"]["fsdp"] == 4, row
