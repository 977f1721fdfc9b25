# %% [markdown]
# # Parallel forward on CPU: fraction of the matmul ceiling, and the ratio to Hugging Face
#
# A 6-layer model of mamba-130m width (d_model 768, vocabulary 50280) at b = 1,
# l = 512. The model's matmul FLOPs (in_proj, x_proj, dt_proj, out_proj, LM head)
# over the measured float32 matrix-product rate of this CPU is the ceiling; the
# Hugging Face `MambaForCausalLM` (CPU PyTorch, same config and weights) runs
# side by side in the same process, interleaved with ours, so both see the same
# machine load. Writes `experiments/results/bench_forward_cpu.json`.

# %%
import argparse
import json
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mamba_jax as mj

# %% Settings
D_MODEL, N_LAYER, VOCAB = 768, 6, 50280
BATCH, SEQ_LEN = 1, 512
REPEATS = 10
MATMUL_N = 2048

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="short sequence and few repeats (smoke test)")
parser.add_argument("--out", default=None, help="JSON path (default experiments/results/bench_forward_cpu.json; "
                    "with --quick a temporary file: a smoke run never overwrites the committed result)")
args, _ = parser.parse_known_args()
if args.quick:
    N_LAYER, SEQ_LEN, REPEATS, MATMUL_N = 2, 64, 2, 512


def timed(fn, repeats):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


# %% The float32 matmul ceiling of this CPU, measured with XLA (what our model uses)
a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
mm = jax.jit(lambda x: x @ x)
mm_times = timed(lambda: mm(a).block_until_ready(), REPEATS)
ceiling = 2 * MATMUL_N**3 / min(mm_times)
print(f"float32 matmul ceiling ({MATMUL_N}^3, best of {REPEATS}): {ceiling / 1e9:.1f} GFLOP/s")

# %% Our model
config = mj.MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB)
model = mj.MambaLM(config, rngs=nnx.Rngs(0))
ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ_LEN), 0, VOCAB, jnp.int32)
forward = nnx.jit(lambda m, x: m(x))
e, d, r, n, V = config.d_model, config.d_inner, config.resolved_dt_rank, config.d_state, config.padded_vocab_size
flops = 2 * BATCH * SEQ_LEN * (N_LAYER * (e * 2 * d + d * (r + 2 * n) + r * d + d * e) + e * V)

# %% Hugging Face MambaForCausalLM with the same weights
try:
    import torch
    import transformers
except ImportError as err:
    raise SystemExit(f"this benchmark runs transformers side by side: pip install -e '.[bench]' ({err})")

# Our weights, through the library's own export (the checkpoint name table).
with tempfile.TemporaryDirectory() as tmpdir:
    mj.save_pretrained(model, tmpdir)
    hf = transformers.MambaForCausalLM.from_pretrained(tmpdir, torch_dtype=torch.float32).eval()
ids_torch = torch.from_numpy(np.asarray(ids, np.int64))

ours_logits = np.asarray(forward(model, ids))
with torch.inference_mode():
    hf_logits = hf(ids_torch).logits.float().numpy()
parity = float(np.linalg.norm(ours_logits - hf_logits) / np.linalg.norm(hf_logits))
print(f"logits relative difference vs transformers: {parity:.2e}")


def run_ours():
    forward(model, ids).block_until_ready()


def run_hf():
    with torch.inference_mode():
        hf(ids_torch)


# %% Interleave the two so they see the same machine
ours_t, hf_t = [], []
run_ours(), run_hf()
for _ in range(REPEATS):
    ours_t += timed(run_ours, 1)
    hf_t += timed(run_hf, 1)
ours_s, hf_s = statistics.median(ours_t), statistics.median(hf_t)
result = {
    "device": f"CPU ({platform.processor() or platform.machine()}, {jax.device_count()} XLA device, "
    f"{torch.get_num_threads()} torch threads)",
    "model": {"d_model": e, "n_layer": N_LAYER, "vocab": V, "batch": BATCH, "seq_len": SEQ_LEN},
    "matmul_flops": flops,
    "ceiling_gflops": ceiling / 1e9,
    "ours_seconds_median": ours_s,
    "hf_seconds_median": hf_s,
    "ours_fraction_of_ceiling": flops / ours_s / ceiling,
    "hf_fraction_of_ceiling": flops / hf_s / ceiling,
    "speedup_vs_hf": hf_s / ours_s,
    "logits_rel_diff_vs_hf": parity,
    "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
}
print(f"\n| implementation | median forward | GFLOP/s | fraction of matmul ceiling |")
print(f"|---|---|---|---|")
print(f"| mamba-jax (XLA) | {ours_s * 1e3:.0f} ms | {flops / ours_s / 1e9:.1f} | {result['ours_fraction_of_ceiling']:.0%} |")
print(f"| transformers MambaForCausalLM | {hf_s * 1e3:.0f} ms | {flops / hf_s / 1e9:.1f} | {result['hf_fraction_of_ceiling']:.0%} |")
print(f"\nspeedup vs transformers: {result['speedup_vs_hf']:.2f}x")
if args.out is None:
    import tempfile

    args.out = (tempfile.mkdtemp(prefix="bench_forward_quick_") + "/bench_forward_cpu.json" if args.quick
                else "experiments/results/bench_forward_cpu.json")
out = pathlib.Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2))
print(f"wrote {out}")
