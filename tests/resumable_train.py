"""A tiny training run that checkpoints with mamba_jax.checkpoint and resumes after a crash.

Driven by tests/test_checkpoint.py as a subprocess (so it can be killed with SIGKILL):

    python tests/resumable_train.py --dir CKPT --log LOSSES --steps 12 --save-every 3
        [--hang-finalize-at STEP]

Each step draws its batch from the data-iterator position (``selective_copying``
with a key folded from the position) and a token-dropout mask from the training
RNG key, so the losses depend on the model, the optimizer state, the RNG and the
data position: all four must be restored for a resumed run to repeat them.
Every step appends ``step loss.hex()`` to LOSSES. ``--hang-finalize-at`` makes
Orbax's finalisation of that step (the rename that commits a checkpoint) block
forever after all its files are written, and writes ``LOSSES.hung``: the test
then SIGKILLs the process in the middle of that save.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import mamba_jax as mj
from mamba_jax.checkpoint import CheckpointManager
from mamba_jax.data.synthetic import selective_copying
from mamba_jax.train import make_optimizer, train_step

CONFIG = mj.MambaConfig.tiny(d_model=32, n_layer=1, vocab_size=16)
BATCH, SEQ_LEN, N_TOKENS = 4, 24, 4
SEED = 0


def make_model_and_optimizer(seed: int = SEED):
    model = mj.MambaLM(CONFIG, rngs=nnx.Rngs(seed))
    return model, make_optimizer(model, learning_rate=3e-3, total_steps=100, warmup_steps=2)


def get_batch(position: int, key: jax.Array) -> dict:
    data = selective_copying(jax.random.fold_in(jax.random.key(1234), position), BATCH, SEQ_LEN, N_TOKENS, CONFIG.vocab_size)
    keep = jax.random.bernoulli(key, 0.9, data["weights"].shape)
    return {**data, "weights": jnp.where(keep, data["weights"], jnp.zeros_like(data["weights"]))}


def hang_finalize_at(step: int, marker: Path) -> None:
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self._final_path.name == str(step):
            marker.write_text(str(self._tmp_path))
            while True:  # all files written, never committed: the crash window
                await asyncio.sleep(1.0)
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--hang-finalize-at", type=int, default=None)
    args = p.parse_args(argv)
    log = Path(args.log)
    if args.hang_finalize_at is not None:
        hang_finalize_at(args.hang_finalize_at, Path(str(log) + ".hung"))

    ckpt = CheckpointManager(args.dir, max_to_keep=3, save_interval_steps=args.save_every)
    abstract_model, abstract_opt = nnx.eval_shape(make_model_and_optimizer)
    restored = ckpt.restore(abstract_model, abstract_opt)
    if restored is None:
        model, optimizer = nnx.jit(make_model_and_optimizer)()  # one compiled init, not one per op
        step, rng, position = 0, jax.random.key(SEED), 0
    else:
        model, optimizer = restored.model, restored.optimizer
        step, rng, position = restored.step, restored.rng, restored.data_state["position"]
        print(f"resumed from step {step}", flush=True)
    with open(log, "a") as f:
        while step < args.steps:
            rng, sub = jax.random.split(rng)
            metrics = train_step(model, optimizer, get_batch(position, sub))
            step, position = step + 1, position + 1
            f.write(f"{step} {float(metrics['loss']).hex()}\n")
            f.flush()
            ckpt.save(step, model, optimizer, rng=rng, data_state={"position": position})
    ckpt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
