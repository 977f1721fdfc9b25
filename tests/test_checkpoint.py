"""Orbax training checkpoints: bit-exact round trip, restore onto an abstract model with a
target sharding, SIGKILL mid-save and resume, damaged checkpoints detected and skipped."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_like
from flax import nnx

import orbax.checkpoint as ocp

import mamba_jax as mj
from mamba_jax.checkpoint import CheckpointManager, CheckpointVersionError, CorruptCheckpointError, is_damage
from mamba_jax.train import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "resumable_train.py"
CFG = mj.MambaConfig.tiny(d_model=32, n_layer=1, vocab_size=16)


def _make(seed=0, param_dtype=jnp.float32):
    model = mj.MambaLM(CFG, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    return model, make_optimizer(model)


def _random_like(abstract, seed):
    """A concrete copy of an abstract module filled by NumPy (conftest.random_like): nothing is
    compiled, so these in-process tests stay fast; tests/resumable_train.py trains for real."""
    return random_like(abstract, seed, fill=lambda rng, shape: rng.standard_normal(shape))


def _trained(seed=0, param_dtype=jnp.float32):
    abstract_model, abstract_opt = nnx.eval_shape(lambda: _make(param_dtype=param_dtype))
    return _random_like(abstract_model, seed), _random_like(abstract_opt, seed + 1000)


def _leaves(module):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(module)))


def _assert_same(a, b):
    """Bit for bit: the same tree, shapes, dtypes and values."""
    ta, tb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
    chex.assert_trees_all_equal_shapes_and_dtypes(ta, tb)
    chex.assert_trees_all_equal(ta, tb)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_bit_exact_onto_abstract_model(tmp_path, param_dtype):
    model, opt = _trained(param_dtype=param_dtype)
    rng = jax.random.split(jax.random.key(5))[0]
    with CheckpointManager(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.save(2, model, opt, rng={"train": rng, "raw": jnp.arange(2, dtype=jnp.uint32)},
                         data_state={"position": 17, "epoch": 1, "files": ["a", "b"]})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2]
    abstract_model, abstract_opt = nnx.eval_shape(lambda: _make(seed=1, param_dtype=param_dtype))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in _leaves(abstract_model))  # nothing allocated
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    restored = CheckpointManager(tmp_path).restore(abstract_model, abstract_opt, sharding=cpu)
    assert restored.step == 2
    assert restored.data_state == {"position": 17, "epoch": 1, "files": ["a", "b"]}
    np.testing.assert_array_equal(jax.random.key_data(restored.rng["train"]), jax.random.key_data(rng))
    assert jax.random.key_impl(restored.rng["train"]) == jax.random.key_impl(rng)
    np.testing.assert_array_equal(restored.rng["raw"], np.arange(2, dtype=np.uint32))
    _assert_same(restored.model, model)
    _assert_same(restored.optimizer, opt)
    for leaf in _leaves(restored.model) + _leaves(restored.optimizer):
        assert leaf.sharding == cpu
    # (that training then continues with the same losses is the SIGKILL test's business)


def test_keeps_last_k_and_sharding_function(tmp_path):
    ckpt = CheckpointManager(tmp_path, max_to_keep=2)
    for step in range(1, 5):
        model, opt = _trained(seed=step)
        ckpt.save(step, model, opt)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    seen = []

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, leaf):
        seen.append(path)
        return replicated

    restored = ckpt.restore(*nnx.eval_shape(_make), sharding=place)
    assert restored.step == 4
    assert all(leaf.sharding == replicated for leaf in _leaves(restored.model))
    assert ("model", "layers", 0, "mixer", "A_log") in seen
    _assert_same(restored.model, model)
    model_only = ckpt.restore(nnx.eval_shape(lambda: _make()[0]), step=3)
    assert model_only.step == 3 and model_only.optimizer is None
    ckpt.close()


def test_no_checkpoint_returns_none(tmp_path):
    assert CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make)) is None


def _save_three(path):
    states = {}
    with CheckpointManager(path, max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            model, opt = _trained(seed=step)
            ckpt.save(step, model, opt, data_state={"position": step})
            states[step] = [np.asarray(x) for x in _leaves(model)]
    return states


def _biggest_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "model").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _biggest_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_byte(step_dir):
    f = _biggest_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte])
def test_corrupted_latest_falls_back_to_previous(tmp_path, damage):
    states = _save_three(tmp_path)
    damage(tmp_path / "3")
    ckpt = CheckpointManager(tmp_path, max_to_keep=3)
    with pytest.warns(UserWarning, match=r"checkpoint step 3 .* unreadable or corrupted"):
        restored = ckpt.restore(*nnx.eval_shape(_make))
    assert restored.step == 2 and restored.data_state == {"position": 2}
    for x, y in zip(_leaves(restored.model), states[2]):
        np.testing.assert_array_equal(np.asarray(x), y)
    # The bad step was moved aside, so training can save step 3 again.
    assert ckpt.all_steps() == [1, 2]
    assert any(p.name.startswith("_corrupted_3_") for p in tmp_path.iterdir())
    ckpt.save(3, restored.model, restored.optimizer)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2, 3]


def test_all_damaged_raises(tmp_path):
    _save_three(tmp_path)
    for step in (1, 2, 3):
        _flip_byte(tmp_path / str(step))
    with pytest.warns(UserWarning, match="corrupted"), pytest.raises(CorruptCheckpointError, match="no intact checkpoint"):
        CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make))


def test_damaged_explicit_step_raises(tmp_path):
    _save_three(tmp_path)
    _flip_byte(tmp_path / "2")
    with pytest.raises(CorruptCheckpointError, match="step 2"):
        CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make), step=2)
    assert (tmp_path / "2").exists()  # an explicit request is not moved aside


def test_wrong_target_is_an_error_not_corruption(tmp_path):
    _save_three(tmp_path)
    other = mj.MambaConfig.tiny(d_model=32, n_layer=1, vocab_size=16, d_state=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "corrupted" warning either
        with pytest.raises(ValueError, match=r"does not match checkpoint step 3.*A_log: saved float32\[64, 16\]"):
            CheckpointManager(tmp_path).restore(nnx.eval_shape(lambda: mj.MambaLM(other, rngs=nnx.Rngs(0))))
    assert CheckpointManager(tmp_path).all_steps() == [1, 2, 3]


def test_interrupted_save_directory_is_ignored_and_reported(tmp_path):
    _save_three(tmp_path)
    partial = tmp_path / "4.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "3", partial)
    _truncate(partial)
    with pytest.warns(UserWarning, match="unfinished checkpoint"):
        ckpt = CheckpointManager(tmp_path)
    assert ckpt.all_steps() == [1, 2, 3]
    assert ckpt.restore(*nnx.eval_shape(_make)).step == 3
    assert not partial.exists()


# --------------------------------------------------------------------------- failures are classified


def _untouched(path, steps=(1, 2, 3)):
    assert CheckpointManager(path).all_steps() == list(steps)
    assert not any(p.name.startswith("_corrupted_") for p in path.iterdir())


def _failing_array_reads(monkeypatch, exc):
    """Make the inner Orbax manager raise ``exc`` when arrays (not the metadata) are read."""
    real = ocp.CheckpointManager.restore

    def restore(self, step, *args, **kwargs):
        composite = kwargs.get("args")
        if composite is not None and "model" in composite.keys():
            raise exc
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)


def _wrapped(inner: BaseException) -> Exception:
    """What Orbax raises around a TensorStore failure: a bare Exception caused by it."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise Exception("Encountered error while reading array index: (slice(0, 64, 1),)") from e
    except Exception as outer:
        return outer


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error"),
        PermissionError(errno.EACCES, "Permission denied"),
        MemoryError("out of host memory"),
        _wrapped(OSError(errno.ETIMEDOUT, "Connection timed out")),
        _wrapped(ValueError('UNAVAILABLE: Error reading "x/0.0" in OCDBT database: connection reset')),
        _wrapped(ValueError("RESOURCE_EXHAUSTED: out of memory while allocating 1.2GiB")),
        ValueError("One of pjit outputs was given the sharding of NamedSharding(mesh=..., spec=P('data',)), "
                   "which implies that the global size of its dimension 0 should be divisible by 3"),
    ],
    ids=["EIO", "EACCES", "MemoryError", "wrapped-ETIMEDOUT", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "sharding"],
)
def test_transient_failure_during_restore_propagates_and_moves_nothing(tmp_path, monkeypatch, exc):
    _save_three(tmp_path)
    _failing_array_reads(monkeypatch, exc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "corrupted" warning either
        with pytest.raises(type(exc)) as info:
            CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make))
    assert info.value is exc  # unchanged, not wrapped
    monkeypatch.undo()
    _untouched(tmp_path)
    assert CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make)).step == 3  # the storage came back


def test_transient_failure_reading_metadata_propagates(tmp_path, monkeypatch):
    _save_three(tmp_path)
    real = ocp.CheckpointManager.restore

    def restore(self, step, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    with pytest.raises(OSError, match="Input/output error"):
        CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make))
    monkeypatch.setattr(ocp.CheckpointManager, "restore", real)
    _untouched(tmp_path)


def test_reported_damage_in_the_chain_moves_the_step_aside(tmp_path, monkeypatch):
    _save_three(tmp_path)
    damage = _wrapped(ValueError('DATA_LOSS: Error reading "layers.0.mixer.A_log/0.0": checksum mismatch'))
    real = ocp.CheckpointManager.restore

    def restore(self, step, *args, **kwargs):
        composite = kwargs.get("args")
        if step == 3 and composite is not None and "model" in composite.keys():
            raise damage
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    with pytest.warns(UserWarning, match="checkpoint step 3 .* unreadable or corrupted"):
        restored = CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make))
    assert restored.step == 2
    assert [p.name.split("_")[2] for p in CheckpointManager(tmp_path).damaged_steps()] == ["3"]


def test_is_damage_needs_positive_evidence():
    assert is_damage(CorruptCheckpointError("fingerprints differ"))
    assert is_damage(FileNotFoundError(errno.ENOENT, "no such file"))
    assert is_damage(_wrapped(ValueError("OUT_OF_RANGE: Requested byte range [0, 9) is not valid")))
    assert is_damage(json.JSONDecodeError("Expecting value", "{", 0))
    assert not is_damage(Exception("something nobody classified"))
    assert not is_damage(KeyError("model"))
    # a transient cause wins over a damage-looking message around it
    assert not is_damage(_wrapped(OSError(errno.EIO, "DATA_LOSS? no: the disk went away")))


def test_other_format_version_raises_and_moves_nothing(tmp_path):
    _save_three(tmp_path)
    meta_file = tmp_path / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointVersionError, match=r"step 3 .* format_version=99"):
            CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make))
    _untouched(tmp_path)


def test_format_version_1_parameters_only_is_still_read(tmp_path):
    states = _save_three(tmp_path)
    meta_file = tmp_path / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 1  # what the parameters-only writer wrote: no typed_keys
    del meta["typed_keys"]
    meta_file.write_text(json.dumps(meta))
    restored = CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make))
    assert restored.step == 3
    chex.assert_trees_all_equal([np.asarray(x) for x in _leaves(restored.model)], states[3])


def test_unparsable_metadata_is_damage(tmp_path):
    _save_three(tmp_path)
    (tmp_path / "3" / "meta" / "metadata").write_text('{"format_version": 2, "step"')  # torn
    with pytest.warns(UserWarning, match="checkpoint step 3 .* unreadable or corrupted"):
        assert CheckpointManager(tmp_path).restore(*nnx.eval_shape(_make)).step == 2


# --------------------------------------------------------------------------- every variable


class _Counted(nnx.Module):
    """A model with variables that are not parameters: a BatchStat, a counter and an RNG stream."""

    def __init__(self, *, rngs, extras=True):
        self.lm = mj.MambaLM(CFG, rngs=rngs)
        if extras:
            self.running = nnx.BatchStat(jnp.zeros((3,), jnp.float32))
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))
            self.rngs = nnx.Rngs(dropout=7)


def test_every_non_param_variable_is_saved_and_restored(tmp_path):
    model = _Counted(rngs=nnx.Rngs(0))
    model.running[...] = jnp.asarray([1.5, -2.0, 3.25], jnp.float32)
    model.calls[...] = jnp.asarray(41, jnp.int32)
    model.rngs.dropout()
    model.rngs.dropout()
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, model)
    restored = CheckpointManager(tmp_path).restore(nnx.eval_shape(lambda: _Counted(rngs=nnx.Rngs(3))))
    got = restored.model
    np.testing.assert_array_equal(got.running[...], [1.5, -2.0, 3.25])
    assert int(got.calls[...]) == 41
    assert int(got.rngs.dropout.count[...]) == 2
    assert jax.random.key_impl(got.rngs.dropout.key[...]) == jax.random.key_impl(model.rngs.dropout.key[...])
    np.testing.assert_array_equal(jax.random.key_data(got.rngs.dropout()), jax.random.key_data(model.rngs.dropout()))
    _assert_same(got.lm, model.lm)


def test_a_variable_missing_from_the_checkpoint_or_the_target_is_an_error(tmp_path):
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, _Counted(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"does not match checkpoint step 1.*model/calls: saved int32\[\], target None"):
        CheckpointManager(tmp_path).restore(nnx.eval_shape(lambda: _Counted(rngs=nnx.Rngs(0), extras=False)))
    other = tmp_path / "plain"
    with CheckpointManager(other) as ckpt:
        ckpt.save(1, _Counted(rngs=nnx.Rngs(0), extras=False))
    with pytest.raises(ValueError, match=r"does not match checkpoint step 1.*model/calls: saved None, target int32\[\]"):
        CheckpointManager(other).restore(nnx.eval_shape(lambda: _Counted(rngs=nnx.Rngs(0))))
    assert CheckpointManager(other).all_steps() == [1]


# --------------------------------------------------------------------------- SIGKILL


def _run(args, env, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _losses(log: Path) -> list[tuple[int, float]]:
    return [(int(s), float.fromhex(h)) for s, h in (line.split() for line in log.read_text().splitlines())]


@pytest.fixture(scope="module")
def script_env(tmp_path_factory):
    env = dict(os.environ)
    # Share compiled executables between the subprocesses (startup cost only).
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_sigkill_mid_save_resumes_with_the_same_losses(tmp_path, script_env):
    steps = 9
    # 1. the uninterrupted run
    ref = _run(["--dir", str(tmp_path / "ref"), "--log", str(tmp_path / "ref.log"), "--steps", str(steps)], script_env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = dict(_losses(tmp_path / "ref.log"))
    assert sorted(expected) == list(range(1, steps + 1))
    # 2. a run whose save of step 6 hangs after writing its files, killed there with SIGKILL
    log = tmp_path / "run.log"
    hung = Path(str(log) + ".hung")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dir", str(tmp_path / "run"), "--log", str(log), "--steps", str(steps),
         "--hang-finalize-at", "6"],
        env=script_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not hung.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the training run never reached the save of step 6"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    tmp_dir = Path(hung.read_text())
    assert tmp_dir.exists() and tmp_dir.name.startswith("6.orbax-checkpoint-tmp")  # killed mid-save
    assert not (tmp_path / "run" / "6").exists()
    before = _losses(log)
    assert max(s for s, _ in before) >= 6
    # 3. resume: the last complete checkpoint is step 3; the unfinished one is reported and removed
    res = _run(["--dir", str(tmp_path / "run"), "--log", str(log), "--steps", str(steps)], script_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from step 3" in res.stdout
    assert "unfinished checkpoint" in res.stderr
    assert not tmp_dir.exists()
    after = _losses(log)[len(before):]
    assert [s for s, _ in after] == list(range(4, steps + 1))
    # every loss ever logged, before the kill and after the resume, is the uninterrupted run's, bit for bit
    for s, loss in before + after:
        assert loss == expected[s], (s, loss, expected[s])
