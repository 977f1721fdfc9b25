"""Orbax training checkpoints: bit-exact round trip, restore onto an abstract model with a
target sharding, SIGKILL mid-save and resume, damaged checkpoints detected and skipped."""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mamba_jax as mj
from mamba_jax.checkpoint import CheckpointManager, CorruptCheckpointError
from mamba_jax.train import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "resumable_train.py"
CFG = mj.MambaConfig.tiny(d_model=32, n_layer=1, vocab_size=16)


def _make(seed=0, param_dtype=jnp.float32):
    model = mj.MambaLM(CFG, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    return model, make_optimizer(model)


def _random_like(abstract, seed):
    """A concrete copy of an abstract module (``nnx.eval_shape``) filled with random values.

    NumPy draws them: nothing is compiled, so these in-process tests stay fast;
    tests/resumable_train.py trains for real in the SIGKILL test."""
    rng = np.random.default_rng(seed)

    def fresh(x):
        if np.issubdtype(x.dtype, np.integer):
            return jnp.asarray(rng.integers(1, 1000, x.shape).astype(x.dtype))
        return jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))

    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(fresh, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _trained(seed=0, param_dtype=jnp.float32):
    abstract_model, abstract_opt = nnx.eval_shape(lambda: _make(param_dtype=param_dtype))
    return _random_like(abstract_model, seed), _random_like(abstract_opt, seed + 1000)


def _leaves(module):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(module)))


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
