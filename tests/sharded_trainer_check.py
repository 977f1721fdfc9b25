"""Run on 8 forced CPU devices (tests/test_sharding.py starts it in a subprocess):
the Trainer with a mesh against the single-device Trainer, and a sharded
checkpoint restored onto another mesh. Prints one JSON line per check.

1. single device: 4 steps, losses L1..L4 and final parameters;
2. fsdp=8: the same 4 steps (checkpoints at steps 2 and 4);
3. the step-4 checkpoint is deleted; a Trainer on data=2 x tensor=4 with the same
   workdir resumes from the fsdp=8 step-2 checkpoint and runs steps 3-4;
4. ``from_pretrained(path, mesh=)`` of a saved model: the values of the unsharded
   load, each parameter with the sharding ``shard_model`` gives it.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import mamba_jax as mj  # noqa: E402
from mamba_jax import sharding as mjs  # noqa: E402
from mamba_jax.train import TrainConfig, Trainer, read_metrics  # noqa: E402

CFG = mj.MambaConfig(d_model=32, n_layer=2, vocab_size=64)
TRAIN = TrainConfig(total_steps=4, learning_rate=1e-2, warmup_steps=1, log_every=1, checkpoint_every=2)


def batch_fn(step):
    rng = np.random.default_rng(step)
    ids = rng.integers(0, 64, (8, 17)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": (rng.random((8, 16)) > 0.2).astype(np.float32)}


def factory():
    return mj.MambaLM(CFG, rngs=nnx.Rngs(0))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def run(model, workdir, mesh):
    config = TRAIN if workdir is not None else TrainConfig(**{**TRAIN.__dict__, "checkpoint_every": 0})
    trainer = Trainer(model, config, workdir=workdir, progress=False, mesh=mesh)
    history = trainer.fit(batch_fn)
    trainer.close()
    return trainer, {r["step"]: r["loss"] for r in history if r["split"] == "train"}


def main():
    assert len(jax.devices()) == 8, jax.devices()
    root = Path(tempfile.mkdtemp())
    single, ref = run(factory(), None, None)
    ref_params = params_of(single.model)

    fsdp = mjs.make_mesh(fsdp=8)
    trainer, losses = run(mjs.init_sharded(factory, fsdp), root / "sharded", fsdp)
    kernel = trainer.model.layers[0].mixer.in_proj.kernel[...]
    moment = [m for m in jax.tree.leaves(nnx.state(trainer.optimizer, nnx.OptState)) if m.shape == kernel.shape][0]
    print(json.dumps(dict(
        check="trainer", layout="fsdp8", loss_err=max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in ref),
        param_err=max(rel(a, b) for a, b in zip(params_of(trainer.model), ref_params)),
        steps=sorted(losses), shard_shape=list(kernel.addressable_shards[0].data.shape), full_shape=list(kernel.shape),
        moment_like_param=moment.sharding.is_equivalent_to(kernel.sharding, kernel.ndim),
    )), flush=True)

    shutil.rmtree(root / "sharded" / "checkpoints" / "4")
    other = mjs.make_mesh(data=2, tensor=4)
    model = mjs.init_sharded(lambda: mj.MambaLM(CFG, rngs=nnx.Rngs(1)), other)  # other values: all restored
    trainer, losses = run(model, root / "sharded", other)
    kernel = trainer.model.layers[0].mixer.in_proj.kernel[...]
    records = read_metrics(root / "sharded" / "metrics.jsonl", "train")
    print(json.dumps(dict(
        check="restore", saved="fsdp8", restored="data2_tensor4", resumed_steps=sorted(losses),
        loss_err=max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in losses),
        param_err=max(rel(a, b) for a, b in zip(params_of(trainer.model), ref_params)),
        metric_steps=[r["step"] for r in records],
        shard_shape=list(kernel.addressable_shards[0].data.shape), full_shape=list(kernel.shape),
        spec=str(kernel.sharding.spec),
    )), flush=True)
    pretrained_row(root / "hf")
    shutil.rmtree(root)


def pretrained_row(path):
    mj.save_pretrained(factory(), path)
    plain = mj.from_pretrained(path)
    mesh = mjs.make_mesh(fsdp=2, tensor=4)
    sharded = mj.from_pretrained(path, mesh=mesh)
    want = mjs.shard_model(mj.from_pretrained(path), mesh)
    pairs = list(zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(want, nnx.Param))))
    kernel = sharded.layers[0].mixer.in_proj.kernel[...]
    print(json.dumps(dict(
        check="from_pretrained", mesh=dict(mesh.shape),
        value_err=max(rel(a, b) for a, b in zip(params_of(sharded), params_of(plain))),
        same_shardings=all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in pairs),
        shard_shape=list(kernel.addressable_shards[0].data.shape), full_shape=list(kernel.shape),
    )), flush=True)


if __name__ == "__main__":
    sys.exit(main())
