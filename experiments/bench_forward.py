# %% [markdown]
# # Parallel forward on CPU: fraction of the matmul ceiling, and the ratio to Hugging Face
#
# Models of mamba-130m and mamba2-130m width (d_model 768, vocabulary 50280),
# scaled down to 6 layers, at b = 1, l = 512. The model's matmul FLOPs (every
# linear layer: in_proj, x_proj, dt_proj, out_proj, and the LM head; the SSD's
# chunk products of Mamba-2 are not counted, so its fraction is a lower bound)
# over the float32 matrix-product rate of this CPU measured in the same run
# (`_common.ceilings`, at the start and the end; the higher is kept) is the
# fraction of the ceiling. The Hugging Face `MambaForCausalLM` (CPU PyTorch,
# same config and weights) runs side by side with the Mamba-1 model in the same
# process, interleaved with ours, so both see the same machine load. Writes
# `experiments/results/bench_forward_cpu.json`.

# %%
import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mamba_jax as mj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_ceilings, ceilings, cpu_model  # noqa: E402

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
ceiling_start = ceilings(matmul_n=MATMUL_N, copy_bytes=1 << 24 if args.quick else 1 << 28, repeats=REPEATS)
print(f"float32 matmul ceiling ({MATMUL_N}^3, best of {REPEATS}): {ceiling_start['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")


def matmul_flops(model, config, tokens):
    """2 x tokens x (every nnx.Linear's in x out, plus the tied LM head e x V)."""
    macs = sum(m.kernel[...].shape[0] * m.kernel[...].shape[1]
               for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear))
    if config.tie_embeddings:
        macs += config.d_model * config.padded_vocab_size
    return 2 * tokens * macs


# %% Our models: Mamba-1 (mamba-130m width) and Mamba-2 (mamba2-130m width), 6 layers each
config = mj.MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB)
config2 = mj.MambaConfig.mamba2_130m(vocab_size=VOCAB).replace(n_layer=N_LAYER)
model = mj.MambaLM(config, rngs=nnx.Rngs(0))
model2 = mj.MambaLM(config2, rngs=nnx.Rngs(0))
ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ_LEN), 0, VOCAB, jnp.int32)
forward = nnx.jit(lambda m, x: m(x))
e, V = config.d_model, config.padded_vocab_size
flops = matmul_flops(model, config, BATCH * SEQ_LEN)
flops2 = matmul_flops(model2, config2, BATCH * SEQ_LEN)

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


def run_ours2():
    forward(model2, ids).block_until_ready()


def run_hf():
    with torch.inference_mode():
        hf(ids_torch)


# %% Interleave the three so they see the same machine
ours_t, ours2_t, hf_t = [], [], []
run_ours(), run_ours2(), run_hf()
for _ in range(REPEATS):
    ours_t += timed(run_ours, 1)
    ours2_t += timed(run_ours2, 1)
    hf_t += timed(run_hf, 1)
ceiling_end = ceilings(matmul_n=MATMUL_N, copy_bytes=1 << 24 if args.quick else 1 << 28, repeats=REPEATS)
ceil = best_ceilings(ceiling_start, ceiling_end)
ceiling = ceil["matmul_flops_per_s"]
ours_s, ours2_s, hf_s = statistics.median(ours_t), statistics.median(ours2_t), statistics.median(hf_t)
result = {
    "device": f"CPU ({cpu_model()}, {os.cpu_count()} cores, {jax.device_count()} XLA device, "
    f"{torch.get_num_threads()} torch threads)",
    "cpu_model": cpu_model(),
    "note": "the CPU may be shared with other jobs (load average below): fractions use a ceiling measured "
    "in the same run, ratios are side by side",
    "load_average_end": os.getloadavg(),
    "quick": bool(args.quick),
    "model": {"d_model": e, "n_layer": N_LAYER, "vocab": V, "batch": BATCH, "seq_len": SEQ_LEN},
    "model_mamba2": {"preset": "mamba2_130m", "n_layer": N_LAYER, "d_state": config2.d_state,
                     "headdim": config2.headdim, "chunk_size": config2.chunk_size},
    "matmul_flops": flops,
    "matmul_flops_mamba2": flops2,
    "ceilings": ceil,
    "ceiling_gflops": ceiling / 1e9,
    "ours_seconds_median": ours_s,
    "ours_mamba2_seconds_median": ours2_s,
    "hf_seconds_median": hf_s,
    "ours_fraction_of_ceiling": flops / ours_s / ceiling,
    "ours_mamba2_fraction_of_ceiling": flops2 / ours2_s / ceiling,
    "hf_fraction_of_ceiling": flops / hf_s / ceiling,
    "speedup_vs_hf": hf_s / ours_s,
    "logits_rel_diff_vs_hf": parity,
    "targets": {"fraction_of_ceiling": 0.65},
    "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
}
print(f"\n| implementation | median forward | GFLOP/s | fraction of matmul ceiling |")
print(f"|---|---|---|---|")
print(f"| mamba-jax Mamba-1 (`impl="auto"`: native CPU scan) | {ours_s * 1e3:.0f} ms | {flops / ours_s / 1e9:.1f} | {result['ours_fraction_of_ceiling']:.0%} |")
print(f"| mamba-jax Mamba-2 (`auto`: XLA chunked SSD) | {ours2_s * 1e3:.0f} ms | {flops2 / ours2_s / 1e9:.1f} | {result['ours_mamba2_fraction_of_ceiling']:.0%} |")
print(f"| transformers MambaForCausalLM | {hf_s * 1e3:.0f} ms | {flops / hf_s / 1e9:.1f} | {result['hf_fraction_of_ceiling']:.0%} |")
print(f"\nspeedup vs transformers: {result['speedup_vs_hf']:.2f}x")
if args.out is None:
    args.out = (tempfile.mkdtemp(prefix="bench_forward_quick_") + "/bench_forward_cpu.json" if args.quick
                else "experiments/results/bench_forward_cpu.json")
out = pathlib.Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2))
print(f"wrote {out}")
