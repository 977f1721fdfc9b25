# %% [markdown]
# # Generation benchmark: decode throughput, flat per-token latency, HF and bandwidth
#
# A mamba-130m-shaped model with random weights, float32, greedy decoding through
# `mamba_jax.generate` (prefill, then the jitted `while_loop` decode):
#
# 1. tokens/s against batch size, side by side with Hugging Face
#    `transformers.MambaForCausalLM` (CPU PyTorch, same config) in the same run;
# 2. per-token decode latency against context length: the context is prefilled
#    in chunks (incrementally: 256, then up to 1k, ...), and at each length the
#    decode is timed from a copy of that cache; the cache size is recorded too;
# 3. batch-1 decode against the memory-bandwidth ceiling: parameter bytes read
#    per token over the measured large-copy bandwidth (`_common.ceilings`, the
#    helper every benchmark here shares: best of NumPy and a donated XLA copy);
# 4. Mamba-2 at the mamba2-130m shape: the batch sweep and batch 1 against the
#    same ceiling (its own parameter and state bytes per token).
#
# Decode time per step is the median interval between consecutive streamed steps
# (the `generate` callback; an HF streamer on the HF side), so prefill is left out
# and preemption by other jobs on a shared CPU does not skew it. The callback's
# own cost is checked at batch 1 against a run without it, timed as a difference
# ``(t(N2 steps) - t(N1 steps)) / (N2 - N1)`` (N1, N2 in one output-buffer bucket).
#
# Writes `experiments/results/bench_generate_<platform>.json` and `.png`.
# `--quick` is a smoke run (small sweeps). The CPU may be shared with other jobs:
# the load average before and after is recorded.

# %%
import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mamba_jax as mj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_of, ceilings, cpu_model  # noqa: E402

# %% Hyperparameters
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
CONTEXTS = [256, 1024, 4096, 16384, 65536]
PROMPT_LEN = 16
STEPS = 32  # timed decode steps per configuration (half that from batch 32 up, to bound the run time)
N1, N2 = 17, 32  # the no-callback cross-check at batch 1 (same buffer bucket: 32)
PREFILL_CHUNK = 256
HF_CONTEXTS = [256, 1024]  # HF prefills with a Python loop over time on CPU: short contexts only
REPEATS = 3  # best of, for the difference timing and the copy bandwidth

QUICK = dict(BATCH_SIZES=[1, 4], CONTEXTS=[256, 1024], HF_CONTEXTS=[256], STEPS=12, N1=5, N2=12)
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# %% Helpers
def copy_bandwidth(nbytes=1 << 30):
    """Large-copy bandwidth in bytes/s (read + write), from the shared ceiling helper
    (``_common.ceilings``: an XLA copy in place with the input donated, and on CPU
    NumPy's copyto; ``best`` is the faster)."""
    c = ceilings(matmul_n=256, copy_bytes=nbytes, repeats=REPEATS)
    by = c["copy_bytes_per_s_by_method"]
    out = {"xla": by["xla_donated"]}
    if "numpy_copyto" in by:
        out["numpy"] = by["numpy_copyto"]
    out["best"] = c["copy_bytes_per_s"]
    return out


def param_bytes(model):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


class StepClock:
    """Host timestamps of every decode step (a generate() callback / an HF streamer)."""

    def __init__(self):
        self.t = []

    def __call__(self, *args):  # mamba_jax callback(step, tokens, finished)
        self.t.append(time.perf_counter())

    def put(self, value):  # HF streamer: called with the prompt, then once per step
        self.t.append(time.perf_counter())

    def end(self):
        pass

    def step_time(self):
        """Median interval between consecutive steps (robust to preemption by other jobs)."""
        return float(np.median(np.diff(self.t[-(self.n - 1) :]))) if len(self.t) >= 3 else float("nan")


def jax_step_time(model, batch, n, cache=None, last=None, seed=0):
    """Seconds per decode step (whole batch): median interval between streamed steps."""
    rng = np.random.RandomState(seed)
    ids = last if cache is not None else jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, PROMPT_LEN)), jnp.int32)
    mj.generate(model, ids, n, temperature=0.0, cache=cache, callback=StepClock()).block_until_ready()  # compile
    clock = StepClock()
    clock.n = n
    mj.generate(model, ids, n, temperature=0.0, cache=cache, callback=clock).block_until_ready()
    return clock.step_time()


def jax_step_time_by_difference(model, batch, n1, n2, seed=0):
    """Seconds per step without the streaming callback: (t(n2) - t(n1)) / (n2 - n1), same buffer bucket."""
    rng = np.random.RandomState(seed)
    ids = jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, PROMPT_LEN)), jnp.int32)
    run = lambda n: mj.generate(model, ids, n, temperature=0.0).block_until_ready()
    run(n2)
    t1 = best_of(lambda: run(n1), 3)
    t2 = best_of(lambda: run(n2), 3)
    return max(t2 - t1, 1e-9) / (n2 - n1)


# %% HF side
def hf_model(jax_model, tmpdir):
    """The Hugging Face model with our weights (mamba_jax.save_pretrained -> MambaForCausalLM.from_pretrained)."""
    import torch
    from transformers import MambaForCausalLM

    mj.save_pretrained(jax_model, tmpdir)
    model = MambaForCausalLM.from_pretrained(tmpdir, torch_dtype=torch.float32)
    return model.eval(), "same weights (mamba_jax.save_pretrained -> MambaForCausalLM.from_pretrained)"


def hf_step_time(model, batch, n, prompt_len=PROMPT_LEN, seed=0, device="cpu"):
    """Seconds per decode step of HF generate(): median interval between streamer calls."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(clock, steps):
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                pad_token_id=0, streamer=clock,
            )

    run(StepClock(), 3)  # warm up
    clock = StepClock()
    clock.n = n
    run(clock, n)
    return clock.step_time()


# %% Main
def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sweeps (smoke run)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    parser.add_argument("--out", default=None, help="output stem (default results/bench_generate_<platform>)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=None)
    args = parser.parse_args(argv)
    g = dict(BATCH_SIZES=BATCH_SIZES, CONTEXTS=CONTEXTS, HF_CONTEXTS=HF_CONTEXTS, STEPS=STEPS, N1=N1, N2=N2)
    if args.quick:
        g.update(QUICK)
    if args.batch_sizes:
        g["BATCH_SIZES"] = args.batch_sizes
    if args.contexts:
        g["CONTEXTS"] = args.contexts
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    out_dir = OUT_DIR
    if args.quick:  # a smoke run never overwrites the committed results
        import tempfile

        out_dir = tempfile.mkdtemp(prefix="bench_generate_quick_")
    stem = args.out or os.path.join(out_dir, f"bench_generate_{backend}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    cfg = mj.MambaConfig.mamba_130m()
    model = mj.MambaLM(cfg, rngs=nnx.Rngs(0))
    pbytes = param_bytes(model)
    result = {
        "config": {k: getattr(cfg, k) for k in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand")},
        "dtype": "float32",
        "decoding": "greedy",
        "platform": backend,
        "device": device,
        "cpu_count": os.cpu_count(),
        "machine": cpu_model(),
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        "method": f"per-step time = median interval between consecutive streamed steps over {g['STEPS']} steps",
        "note": "CPU shared with other jobs: absolute times are noisy; ratios are from one run"
        if backend == "cpu" else f"one {device}",
        "param_bytes": pbytes,
        "quick": args.quick,
    }

    # 1. Bandwidth ceiling.
    bw = bw_start = copy_bandwidth(1 << 28 if args.quick else 1 << 30)
    cache_bytes = model.init_cache(1).nbytes()
    bytes_per_token = pbytes + 2 * cache_bytes  # weights read once, state read and written
    ceiling_s = bytes_per_token / bw["best"]
    result["bandwidth"] = {"copy_bytes_per_s": bw, "bytes_per_token": bytes_per_token, "ceiling_s_per_token": ceiling_s}
    print(f"copy bandwidth: {', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in bw.items())}; batch-1 ceiling "
          f"{ceiling_s * 1e3:.2f} ms/token ({bytes_per_token / 1e6:.0f} MB/token)", flush=True)

    # HF, measured right after mamba_jax for each configuration (the CPU load drifts over minutes).
    hf = hf_info = torch_device = None
    if not args.no_hf:
        import tempfile

        import torch
        import transformers

        torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory() as tmp:
            hf, weights = hf_model(model, tmp)
        hf = hf.to(torch_device)
        hf_info = {"weights": weights, "torch": torch.__version__, "transformers": transformers.__version__,
                   "device": torch_device}
        if torch_device == "cpu":
            # torch's OpenMP threads suffer badly when a core is taken by another job: use the
            # faster of 1 and all threads (chosen at batch 1), and record both.
            per_threads = {}
            for threads in sorted({1, torch.get_num_threads()}):
                torch.set_num_threads(threads)
                per_threads[threads] = hf_step_time(hf, 1, g["STEPS"])
            best = min(per_threads, key=per_threads.get)
            torch.set_num_threads(best)
            hf_info.update(threads=best, batch1_s_per_step_by_threads=per_threads)
            print(f"hf   batch 1 by torch threads: { {k: round(v * 1e3, 2) for k, v in per_threads.items()} } ms -> {best}")

    # 2. Batch sweep.
    rows = []
    for b in g["BATCH_SIZES"]:
        t0 = time.perf_counter()
        steps = g["STEPS"] if b < 32 else max(8, g["STEPS"] // 2)
        step = jax_step_time(model, b, steps)
        row = {"batch": b, "jax_s_per_step": step, "jax_tokens_per_s": b / step}
        msg = f"batch {b:3d}: jax {step * 1e3:8.2f} ms/step {b / step:9.1f} tok/s"
        if hf is not None:
            hstep = hf_step_time(hf, b, steps, device=torch_device)
            row.update(hf_s_per_step=hstep, hf_tokens_per_s=b / hstep, speedup=hstep / step)
            msg += f" | hf {hstep * 1e3:8.2f} ms/step {b / hstep:9.1f} tok/s | jax/hf {row['speedup']:.2f}x"
        rows.append(row)
        print(msg + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    no_cb = jax_step_time_by_difference(model, 1, g["N1"], g["N2"])
    print(f"jax  batch   1 without the callback (difference of two runs): {no_cb * 1e3:.2f} ms/step", flush=True)

    # 2b. Mamba-2 at the mamba2-130m shape (same depth as the Mamba-1 model): the batch sweep and
    # batch 1 against the same bandwidth ceiling (its own weights and state bytes per token).
    cfg2 = mj.MambaConfig.mamba2_130m()
    model2 = mj.MambaLM(cfg2, rngs=nnx.Rngs(0))
    bytes2 = param_bytes(model2) + 2 * model2.init_cache(1).nbytes()
    rows2 = []
    for b in g["BATCH_SIZES"]:
        steps = g["STEPS"] if b < 32 else max(8, g["STEPS"] // 2)
        step = jax_step_time(model2, b, steps)
        rows2.append({"batch": b, "jax_s_per_step": step, "jax_tokens_per_s": b / step,
                      "over_mamba1_tokens_per_s": (b / step) / next(r["jax_tokens_per_s"] for r in rows if r["batch"] == b)})
        print(f"mamba2 batch {b:3d}: jax {step * 1e3:8.2f} ms/step {b / step:9.1f} tok/s", flush=True)
    no_cb2 = jax_step_time_by_difference(model2, 1, g["N1"], g["N2"])
    result["mamba2"] = {
        "config": {k: getattr(cfg2, k) for k in ("d_model", "n_layer", "vocab_size", "d_state", "headdim", "expand")},
        "param_bytes": param_bytes(model2), "bytes_per_token": bytes2, "batch_sweep": rows2,
        "batch1_ms_per_token": rows2[0]["jax_s_per_step"] * 1e3 if rows2[0]["batch"] == 1 else None,
        "batch1_ms_per_token_without_callback": no_cb2 * 1e3,
    }

    # 3. Context sweep, JAX: prefill incrementally, time decode from a copy of the cache.
    gd, st = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def prefill(state, cache, ids):
        _, cache = nnx.merge(gd, state)(ids, cache=cache)
        return cache

    rng = np.random.RandomState(1)
    cache = model.init_cache(1)  # independent buffers: donatable
    ctx_rows, done = [], 0
    for ctx in g["CONTEXTS"]:
        t0 = time.perf_counter()
        while done < ctx:
            ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, PREFILL_CHUNK)), jnp.int32)
            cache = prefill(st, cache, ids)
            done += PREFILL_CHUNK
        jax.block_until_ready(cache)
        t_pre = time.perf_counter() - t0
        last = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 1)), jnp.int32)
        step = jax_step_time(model, 1, g["STEPS"], cache=cache, last=last)
        row = {"context": ctx, "jax_s_per_token": step, "cache_bytes": cache.nbytes(), "prefill_s": t_pre}
        ctx_rows.append(row)
        msg = (f"context {ctx:6d}: jax {step * 1e3:8.2f} ms/token, cache {cache.nbytes() / 1e6:.2f} MB "
               f"(prefill of {ctx - (ctx_rows[-2]['context'] if len(ctx_rows) > 1 else 0)} tokens in "
               f"{PREFILL_CHUNK}-token chunks: {t_pre:.0f} s)")
        if hf is not None and ctx in g["HF_CONTEXTS"]:
            hstep = hf_step_time(hf, 1, g["STEPS"], prompt_len=ctx, device=torch_device)
            row.update(hf_s_per_token=hstep, speedup=hstep / step)
            msg += f" | hf {hstep * 1e3:8.2f} ms/token | jax/hf {row['speedup']:.2f}x"
        print(msg, flush=True)

    # The copy again at the end (the CPU may be shared): keep the higher bandwidth, the stricter ceiling.
    bw_end = copy_bandwidth(1 << 28 if args.quick else 1 << 30)
    if bw_end["best"] > bw["best"]:
        bw = bw_end
        ceiling_s = bytes_per_token / bw["best"]
        result["bandwidth"] = {"copy_bytes_per_s": bw, "bytes_per_token": bytes_per_token, "ceiling_s_per_token": ceiling_s}
    result["bandwidth"]["measurements"] = {"start": bw_start, "end": bw_end}
    print(f"copy bandwidth at the end: {bw_end['best'] / 1e9:.1f} GB/s; ceiling {ceiling_s * 1e3:.2f} ms/token", flush=True)

    b1 = next(r for r in rows if r["batch"] == 1)
    m2 = result["mamba2"]
    m2["ceiling_ms_per_token"] = m2["bytes_per_token"] / bw["best"] * 1e3
    m2["fraction_of_bandwidth_ceiling_without_callback"] = m2["ceiling_ms_per_token"] / m2["batch1_ms_per_token_without_callback"]
    if m2["batch1_ms_per_token"]:
        m2["fraction_of_bandwidth_ceiling"] = m2["ceiling_ms_per_token"] / m2["batch1_ms_per_token"]
    result.update(
        batch_sweep=rows,
        context_sweep=ctx_rows,
        hf=hf_info,
        batch1={
            "jax_ms_per_token": b1["jax_s_per_step"] * 1e3,
            "jax_ms_per_token_without_callback": no_cb * 1e3,
            "hf_ms_per_token": b1.get("hf_s_per_step", float("nan")) * 1e3,
            "speedup_vs_hf": b1.get("speedup"),
            "ceiling_ms_per_token": ceiling_s * 1e3,
            "fraction_of_bandwidth_ceiling": ceiling_s / b1["jax_s_per_step"],
            "fraction_of_bandwidth_ceiling_without_callback": ceiling_s / no_cb,
            "targets": {"speedup_vs_hf": 2.5, "fraction_of_bandwidth_ceiling": 0.7},
        },
        context_flatness={
            "max_over_min_ms_per_token": max(r["jax_s_per_token"] for r in ctx_rows)
            / min(r["jax_s_per_token"] for r in ctx_rows),
            "cache_bytes_constant": len({r["cache_bytes"] for r in ctx_rows}) == 1,
        },
        load_average={"before": load_before, "after": os.getloadavg()},
        wall_s=time.perf_counter() - t_start,
    )
    print(json.dumps(result["batch1"], indent=1))
    print("mamba2:", json.dumps({k: v for k, v in result["mamba2"].items() if k != "batch_sweep"}, indent=1))
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, stem + ".png")
    print(f"wrote {stem}.json and .png in {result['wall_s']:.0f} s")
    return result


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result["batch_sweep"]
    bs = [r["batch"] for r in rows]
    ax1.plot(bs, [r["jax_tokens_per_s"] for r in rows], "o-", label="mamba_jax (jitted while_loop)")
    if rows and "hf_tokens_per_s" in rows[0]:
        hf_dev = (result.get("hf") or {}).get("device", "cpu")
        ax1.plot(bs, [r["hf_tokens_per_s"] for r in rows], "s--", label=f"HF MambaForCausalLM (torch {hf_dev})")
    if "mamba2" in result:
        r2 = result["mamba2"]["batch_sweep"]
        ax1.plot([r["batch"] for r in r2], [r["jax_tokens_per_s"] for r in r2], "^-", label="mamba_jax Mamba-2 (mamba2-130m)")
    ax1.axhline(1 / result["bandwidth"]["ceiling_s_per_token"], color="gray", ls=":", label="batch-1 bandwidth ceiling")
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="generated tokens / s", title="Decode throughput")
    ax1.set_xticks(bs, [str(b) for b in bs])
    ax1.legend(fontsize=8)
    ctx = result["context_sweep"]
    cs = [r["context"] for r in ctx]
    ax2.plot(cs, [r["jax_s_per_token"] * 1e3 for r in ctx], "o-", label="mamba_jax, batch 1")
    hf = [(r["context"], r["hf_s_per_token"] * 1e3) for r in ctx if "hf_s_per_token" in r]
    if hf:
        ax2.plot(*zip(*hf), "s--", label="HF, batch 1")
    ax2.axhline(result["bandwidth"]["ceiling_s_per_token"] * 1e3, color="gray", ls=":", label="bandwidth ceiling")
    ax2.set(xscale="log", xlabel="context length (tokens already in the state)", ylabel="ms / generated token",
            title="Per-token latency vs context")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(f"mamba-130m shape, float32, {result['device']} ({result['platform']}); {result['note']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
