"""Train a language model on a device mesh, on one process or many: ``python -m mamba_jax.train_lm``.

    python -m mamba_jax.train_lm --preset tiny --data bytes --mesh data=2,fsdp=4 --steps 1000 \\
        --batch-size 32 --seq-len 512 --seed 0 --out runs/a \\
        [--coordinator HOST:PORT --num-processes P --process-id I]

``--data`` is a synthetic task (``selective_copying``, ``induction_heads``, ``mqar``),
``bytes`` (the offline byte corpus: Python's standard library and GCIDE, see
:class:`mamba_jax.data.ByteCorpus`), a text file (its bytes are the tokens, vocabulary
256) or a ``.npy`` array of token ids (one stream, memory-mapped; vocabulary
``--vocab-size`` or its largest id + 1).

Multi-host. With ``--coordinator/--num-processes/--process-id`` every process calls
``jax.distributed.initialize`` with them; on a TPU pod slice (more than one name in
``TPU_WORKER_HOSTNAMES``) it is called without arguments and JAX finds its peers
itself. The mesh then spans every device of every process.

The data of a step does not depend on the number of processes: row ``r`` of the
global batch of step ``s`` is drawn from a generator seeded by ``(seed, s, r)`` alone
(a window start in a token stream, or a synthetic example from
``fold_in(fold_in(key(seed), s), r)``), and each process draws only the rows it holds
(:func:`mamba_jax.sharding.process_rows`). So 2 processes x 4 devices and 1 process x
8 devices train on the same batches and, on the same mesh shape, give the same losses.

Process 0 writes ``OUT/metrics.jsonl`` (``{"split": "train", "step": s, "loss": x, ...}``
per line, see :class:`mamba_jax.train.Trainer`) and ``OUT/run.json`` (the arguments,
the mesh and the process count). ``--checkpoint-every N`` saves Orbax checkpoints to
``OUT/checkpoints`` (every process writes its shards; the directory must be shared) and
a rerun resumes from the latest, onto whatever mesh it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SYNTHETIC = ("selective_copying", "induction_heads", "mqar")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (axes data, fsdp, tensor, sequence; -1 takes the rest)."""
    from mamba_jax.sharding import AXES

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in AXES:
            raise ValueError(f"--mesh {text!r}: {part!r} must be AXIS=SIZE with AXIS one of {AXES}")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size {value!r} of {name} is not an int") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mamba_jax.train_lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="a MambaConfig preset: tiny, mamba_130m ... mamba_2_8b, mamba2_130m ...")
    p.add_argument("--d-model", type=int, help="override the preset's d_model")
    p.add_argument("--n-layer", type=int, help="override the preset's n_layer")
    p.add_argument("--scan-layers", action="store_true", help="one lax.scan over the blocks (MambaConfig.scan_layers)")
    p.add_argument("--remat", default="none", help="rematerialise each block: none, full, dots or a jax.checkpoint_policies name")
    p.add_argument("--data", default="bytes", help=f"{', '.join(SYNTHETIC)}, bytes, a text file or a .npy token array")
    p.add_argument("--vocab-size", type=int, help="vocabulary of a .npy token array (default: its largest id + 1)")
    p.add_argument("--max-bytes", type=int, default=50_000_000, help="cap of the byte corpus (--data bytes)")
    p.add_argument("--mesh", default="data=-1", help="mesh axes, e.g. data=2,fsdp=4 (absent axes 1, one may be -1)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, required=True, help="global batch size (rows), over every process")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data")
    p.add_argument("--out", required=True, help="output directory (metrics.jsonl, run.json, checkpoints)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, help="number of processes (multi-process runs)")
    p.add_argument("--process-id", type=int, help="this process's index in [0, num_processes)")
    return p


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` with the flags, or by itself on a TPU pod slice, or not at all."""
    import jax

    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(given):
        if not all(given):
            raise ValueError("--coordinator, --num-processes and --process-id go together (all three or none)")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id {args.process_id} must be in [0, --num-processes {args.num_processes})")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU VM slice
        jax.distributed.initialize()


def make_config(args, vocab_size: int):
    from mamba_jax.config import MambaConfig

    factory = getattr(MambaConfig, args.preset, None)
    if args.preset.startswith("_") or not callable(factory) or args.preset in ("replace", "mamba2"):
        presets = [n for n in dir(MambaConfig) if n == "tiny" or n.startswith(("mamba_", "mamba2_"))]
        raise ValueError(f"--preset {args.preset!r} is not one of {presets}")
    overrides = {"vocab_size": vocab_size, "scan_layers": args.scan_layers, "remat": args.remat}
    if args.d_model is not None:
        overrides["d_model"] = args.d_model
    if args.n_layer is not None:
        overrides["n_layer"] = args.n_layer
    return factory(**overrides)


def _row_rng(seed: int, step: int, row: int):
    import numpy as np

    return np.random.default_rng([seed, step, row])


class StreamData:
    """Random windows of a 1-D token stream; row ``r`` of step ``s`` starts where the
    generator seeded by ``(seed, s, r)`` says."""

    def __init__(self, tokens, vocab_size: int, seq_len: int, seed: int, what: str):
        if tokens.ndim != 1 or tokens.size <= seq_len + 1:
            raise ValueError(f"{what}: a 1-D token stream longer than --seq-len + 1 = {seq_len + 1} is needed, got shape {tokens.shape}")
        self.tokens, self.vocab_size, self.seq_len, self.seed = tokens, vocab_size, seq_len, seed

    def rows(self, step: int, rows: range) -> dict:
        import numpy as np

        n = self.tokens.size - self.seq_len - 1
        windows = np.stack([
            np.asarray(self.tokens[s : s + self.seq_len + 1], np.int32)
            for s in (int(_row_rng(self.seed, step, r).integers(0, n + 1)) for r in rows)
        ])
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "weights": np.ones((len(rows), self.seq_len), np.float32)}


class SyntheticData:
    """A synthetic task; row ``r`` of step ``s`` is the task's one-row batch for the key
    ``fold_in(fold_in(key(seed), s), r)``."""

    VOCAB = 16

    def __init__(self, task: str, seq_len: int, seed: int):
        import jax

        from mamba_jax import data

        fn = getattr(data, task)
        if task == "selective_copying":
            n_tokens = max(1, seq_len // 8)
            one = lambda k: fn(k, 1, seq_len - n_tokens, n_tokens, self.VOCAB)
        elif task == "mqar":
            self.VOCAB = 8192 if seq_len >= 256 else 512
            one = lambda k: fn(k, 1, seq_len, max(1, seq_len // 8), vocab_size=self.VOCAB)
        else:
            one = lambda k: fn(k, 1, seq_len, self.VOCAB)
        self.vocab_size, self.seed = self.VOCAB, seed
        self._batch = jax.jit(jax.vmap(lambda k: jax.tree.map(lambda x: x[0], one(k))))

    def rows(self, step: int, rows: range) -> dict:
        import jax
        import numpy as np

        base = jax.random.fold_in(jax.random.key(self.seed), step)
        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(np.asarray(list(rows), np.uint32))
        return {k: np.asarray(v) for k, v in self._batch(keys).items()}


def make_data(args):
    import numpy as np

    if args.data in SYNTHETIC:
        return SyntheticData(args.data, args.seq_len, args.seed)
    if args.data == "bytes":
        from mamba_jax.data import ByteCorpus

        return StreamData(ByteCorpus.from_stdlib(max_bytes=args.max_bytes).train, 256, args.seq_len, args.seed, "--data bytes")
    path = Path(args.data)
    if not path.is_file():
        raise ValueError(f"--data {args.data!r} is neither one of {SYNTHETIC + ('bytes',)} nor a file")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"--data {path}: a .npy of integer token ids is needed, got {tokens.dtype}")
        vocab = args.vocab_size if args.vocab_size is not None else int(tokens.max()) + 1
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise ValueError(f"--data {path}: token ids must lie in [0, {vocab}), got [{tokens.min()}, {tokens.max()}]")
        return StreamData(tokens, vocab, args.seq_len, args.seed, f"--data {path}")
    return StreamData(np.fromfile(path, np.uint8), 256, args.seq_len, args.seed, f"--data {path}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    init_distributed(args)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mamba_jax import sharding as mjs
    from mamba_jax.model import MambaLM
    from mamba_jax.train import TrainConfig, Trainer

    mesh = mjs.make_mesh(**parse_mesh(args.mesh))
    rows = mjs.process_rows(mesh, args.batch_size)
    data = make_data(args)
    config = make_config(args, data.vocab_size)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = mjs.init_sharded(lambda: MambaLM(config, dtype=dtype, rngs=nnx.Rngs(args.seed)), mesh)
    out = Path(args.out)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        run = {
            "args": vars(args), "mesh": dict(mesh.shape), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "platform": jax.devices()[0].platform, "config": repr(config),
        }
        (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    train = TrainConfig(
        total_steps=args.steps, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
    )
    trainer = Trainer(
        model, train, workdir=out, mesh=mesh, description=f"train_lm p{jax.process_index()}",
        progress=jax.process_index() == 0 and sys.stderr.isatty(),
    )
    local = range(rows.start, rows.stop)
    history = trainer.fit(lambda step: data.rows(step, local))
    trainer.close()
    last = [r for r in history if r["split"] == "train"][-1:]
    if jax.process_index() == 0 and last:
        print(f"step {last[0]['step']}: loss {last[0]['loss']:.4f} ({out / 'metrics.jsonl'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
