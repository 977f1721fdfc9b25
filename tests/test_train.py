"""Training: cross-entropy, the train step, the Trainer (accumulation, metrics, resume), the demo's smoke run."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mamba_jax as mj
from mamba_jax.data import selective_copying
from mamba_jax.train import Trainer, TrainConfig, _grads_and_metrics, cross_entropy, evaluate, make_optimizer, read_metrics, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cross_entropy_matches_numpy():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, 2, 3], [0, 4, 4]], jnp.int32)
    weights = jnp.array([[1, 0, 1], [1, 1, 0]], jnp.float32)
    loss, acc = cross_entropy(logits, targets, weights)
    lp = np.asarray(jax.nn.log_softmax(logits))
    picked = np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, -(picked * np.asarray(weights)).sum() / 4, rtol=1e-6)
    hits = (np.asarray(logits).argmax(-1) == np.asarray(targets)) * np.asarray(weights)
    np.testing.assert_allclose(acc, hits.sum() / 4, rtol=1e-6)


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    model = mj.MambaLM(mj.MambaConfig.tiny(vocab_size=16), rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, learning_rate=3e-3, total_steps=30, warmup_steps=3)
    batch = selective_copying(jax.random.key(1), 8, 16, 4, 16)
    losses = [float(train_step(model, optimizer, batch)["loss"]) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_weight_decay_skips_vectors_and_A_log():
    model = mj.MambaLM(mj.MambaConfig.tiny(vocab_size=16), rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, learning_rate=1.0, weight_decay=0.5, warmup_steps=0, total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    before = nnx.state(model, nnx.Param)
    before = jax.tree.map(lambda x: np.asarray(x), before)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
        optimizer.update(model, zero)  # zero gradients: only weight decay can move parameters
    after = nnx.state(model, nnx.Param)
    mixer_before, mixer_after = before["layers"][0]["mixer"], after["layers"][0]["mixer"]
    np.testing.assert_array_equal(mixer_after["A_log"][...], mixer_before["A_log"][...])
    np.testing.assert_array_equal(mixer_after["D"][...], mixer_before["D"][...])
    np.testing.assert_array_equal(after["norm_f"]["weight"][...], before["norm_f"]["weight"][...])


@pytest.mark.parametrize("layer", ["mamba1", "mamba2"])
def test_demo_quick_run(tmp_path, layer):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments/00_demo_selective_copying.py"), "--quick", "--layer", layer,
         "--checkpoint-dir", str(tmp_path / "ckpt"), "--results", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "held-out accuracy" in proc.stdout and "restored: same accuracy" in proc.stdout
    assert (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- Trainer

_TINY = mj.MambaConfig.tiny(d_model=32, n_layer=1, vocab_size=16)


def _batch_fn(step: int) -> dict:
    return selective_copying(jax.random.fold_in(jax.random.key(5), step), 8, 16, 4, 16)


def _trainer(tmp_path, total_steps=12, **kw) -> Trainer:
    model = mj.MambaLM(_TINY, rngs=nnx.Rngs(0))
    config = TrainConfig(total_steps=total_steps, learning_rate=3e-3, warmup_steps=2, log_every=1, **kw)
    return Trainer(model, config, workdir=tmp_path, progress=False)


def test_gradient_accumulation_gives_the_whole_batch_gradient():
    model = mj.MambaLM(_TINY, rngs=nnx.Rngs(0))
    batch = selective_copying(jax.random.key(1), 8, 16, 4, 16)
    # Uneven weights across rows: the split must still weight every token equally.
    batch["weights"] = batch["weights"] * jnp.arange(1, 9, dtype=jnp.float32)[:, None]
    g1, m1 = _grads_and_metrics(model, batch, 1)
    g4, m4 = _grads_and_metrics(model, batch, 4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_trainer_lowers_the_loss_and_writes_metrics(tmp_path):
    trainer = _trainer(tmp_path, total_steps=30, eval_every=10)
    fixed = _batch_fn(0)
    history = trainer.fit(lambda step: fixed, eval_fn=lambda m: evaluate(m, [fixed]))
    train = [r for r in history if r["split"] == "train"]
    assert len(train) == 30 and train[-1]["loss"] < 0.7 * train[0]["loss"], [r["loss"] for r in train]
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["grad_norm"]) for r in train)
    assert [r["step"] for r in history if r["split"] == "eval"] == [10, 20, 30]
    assert read_metrics(tmp_path / "metrics.jsonl") == history
    # The trained weights are in the model object itself.
    assert evaluate(trainer.model, [fixed])["loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)


class _Crash(Exception):
    pass


def test_trainer_resume_continues_the_same_trajectory(tmp_path):
    straight = _trainer(tmp_path / "a").fit(_batch_fn)

    def crashing(step):
        if step == 6:
            raise _Crash
        return _batch_fn(step)

    first = _trainer(tmp_path / "b", checkpoint_every=4)
    with pytest.raises(_Crash):
        first.fit(crashing)  # steps 1-6 logged, checkpoint at 4 only
    first.close()
    # A new process builds a fresh model; it resumes from step 4, drops the records
    # of steps 5-6 and repeats them with the same losses as the uninterrupted run.
    resumed = _trainer(tmp_path / "b", checkpoint_every=4)
    rest = resumed.fit(_batch_fn)
    resumed.close()
    assert resumed.step == 12 and [r["step"] for r in rest] == list(range(5, 13))
    np.testing.assert_allclose([r["loss"] for r in rest], [r["loss"] for r in straight[4:]], rtol=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 13))


def test_trainer_bfloat16_compute_trains():
    model = mj.MambaLM(_TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    trainer = Trainer(model, TrainConfig(total_steps=30, learning_rate=3e-3, warmup_steps=2, log_every=1), progress=False)
    fixed = _batch_fn(0)
    losses = [r["loss"] for r in trainer.fit(lambda step: fixed)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_trainer_rejects_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="total_steps"):
        TrainConfig(total_steps=0)
    with pytest.raises(ValueError, match="eval_every=5 needs an eval_fn"):
        _trainer(tmp_path, eval_every=5).fit(_batch_fn)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        _trainer(tmp_path, grad_accum_steps=3).fit(_batch_fn)


def test_fit_refuses_to_start_over_when_only_damaged_checkpoints_remain(tmp_path):
    trainer = _trainer(tmp_path, total_steps=4, checkpoint_every=2)
    trainer.fit(_batch_fn)
    trainer.close()
    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4):  # as restore() leaves them when every step was damaged
        (ckpt_dir / str(step)).rename(ckpt_dir / f"_corrupted_{step}_1700000000")
    fresh = _trainer(tmp_path, total_steps=4, checkpoint_every=2)
    with pytest.raises(RuntimeError, match=r"_corrupted_2_1700000000.*_corrupted_4_1700000000.*allow_fresh_start=True"):
        fresh.fit(_batch_fn)
    assert fresh.step == 0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]  # nothing rewritten
    history = fresh.fit(_batch_fn, allow_fresh_start=True)
    fresh.close()
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_metrics_survive_a_torn_last_line_on_resume(tmp_path):
    first = _trainer(tmp_path, total_steps=4, checkpoint_every=2)
    first.fit(_batch_fn)
    first.close()
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "split": "train", "lo')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line 5"):
        assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]
    resumed = _trainer(tmp_path, total_steps=6, checkpoint_every=2)
    with pytest.warns(UserWarning, match="torn last line"):
        rest = resumed.fit(_batch_fn)
    resumed.close()
    assert [r["step"] for r in rest] == [5, 6]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_metrics_damaged_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl\n{"step": 3, "split": "train"}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(path)


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    first = _trainer(tmp_path, total_steps=4, checkpoint_every=2)
    first.fit(_batch_fn)
    first.close()
    metrics = tmp_path / "metrics.jsonl"
    before = metrics.read_bytes()
    replaced = []

    def failing_replace(src, dst):
        replaced.append((pathlib.Path(src), pathlib.Path(dst)))
        raise OSError("disk full")  # the crash between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _trainer(tmp_path, total_steps=6, checkpoint_every=2).fit(_batch_fn)
    (src, dst), = replaced
    assert dst == metrics and src.parent == tmp_path and src != metrics
    assert metrics.read_bytes() == before  # the old file, whole
    assert not src.exists()  # and no temporary file left behind
