"""Run on 8 forced CPU devices (tests/test_sharding.py starts it in a subprocess):
one AdamW step of small Mamba-1 and hybrid models on every mesh layout against
the single-device run. Prints one JSON line per (model, layout)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import mamba_jax as mj  # noqa: E402
from mamba_jax import sharding as mjs  # noqa: E402
from mamba_jax.train import make_optimizer, train_step  # noqa: E402

LAYOUTS = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "tensor8": dict(tensor=8),
    "sequence8": dict(sequence=8),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp2_tensor2_sequence2": dict(fsdp=2, tensor=2, sequence=2),
    "data_rest_tensor4": dict(data=-1, tensor=4),
}
MODELS = {
    "mamba": dict(d_model=32, n_layer=2, vocab_size=64),
    "hybrid": dict(d_model=32, n_layer=2, vocab_size=64, attn_layer_idx=(1,), attn_num_heads=8,
                   attn_num_heads_kv=8, d_intermediate=64),
    "mamba2": dict(d_model=32, n_layer=2, vocab_size=64, layer="mamba2", d_state=16, headdim=8, chunk_size=8),
}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel(a, b):
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def batch_for(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(k1, (8, 17), 0, 64)
    w = (jax.random.uniform(k2, (8, 16)) > 0.2).astype(jnp.float32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": w}


def step(model, batch):
    """One AdamW step; also whether every optimizer moment is sharded like its parameter."""
    optimizer = make_optimizer(model, learning_rate=1e-2, warmup_steps=0, total_steps=10)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    moments = [m for m in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if m.ndim > 0]
    like_params = all(
        any(p.shape == m.shape and m.sharding.is_equivalent_to(p.sharding, m.ndim) for p in params) for m in moments
    )
    metrics = train_step(model, optimizer, batch)
    return float(metrics["loss"]), float(metrics["grad_norm"]), nnx.state(model, nnx.Param), like_params


def scan_rows():
    """selective_scan under shard_map (tensor x sequence, with an initial state and
    grouped B/C) against the unsharded reference: outputs and every gradient."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from scan_inputs import make_scan_inputs

    args = make_scan_inputs(0, 2, 32, 16, 4, 2)
    names = list(args)
    w = jax.random.normal(jax.random.key(1), (2, 32, 16), jnp.float32)

    def loss(impl, *values):
        y, h = mj.ops.selective_scan(**dict(zip(names, values)), delta_softplus=True, return_final_state=True, impl=impl)
        return jnp.sum(y * w) + jnp.sum(h * h), (y, h)

    grad = lambda impl: jax.jit(jax.grad(lambda *v: loss(impl, *v), argnums=tuple(range(len(names))), has_aux=True))
    ref_grads, ref_out = grad("reference")(*args.values())
    for impl in ("sequential", "cpu", "pallas"):  # cpu: the native kernel (XLA FFI) in shard_map
        for axes in (dict(tensor=2, sequence=4), dict(data=2, sequence=4)):
            mesh = mjs.make_mesh(**axes)
            with jax.set_mesh(mesh):
                grads, out = grad(impl)(*args.values())
            print(json.dumps(dict(scan=impl, mesh=dict(mesh.shape), out_err=tree_rel(out, ref_out),
                                  grad_err=tree_rel(grads, ref_grads))), flush=True)


def ssd_rows():
    """ssd under shard_map (heads over tensor with grouped B/C, batch over data, time over
    sequence with the prefix correction) with an initial state, D, z, dt_bias, a dt clamp
    and packed documents (one starting exactly at a shard boundary) against the unsharded
    reference: outputs and every gradient; the chunked XLA path and the Pallas kernel (on
    CPU the TPU kernel interpreted; chunk 16, which every platform's kernel takes)."""
    b, l, h, p, g, n = 2, 32, 4, 8, 2, 8
    ks = jax.random.split(jax.random.key(2), 9)
    args = dict(
        x=jax.random.normal(ks[0], (b, l, h, p)), dt=jax.random.normal(ks[1], (b, l, h)) - 1.0,
        A=-jnp.exp(jax.random.normal(ks[2], (h,))), B=jax.random.normal(ks[3], (b, l, g, n)),
        C=jax.random.normal(ks[4], (b, l, g, n)), D=jax.random.normal(ks[5], (h,)),
        z=jax.random.normal(ks[6], (b, l, h, p)), dt_bias=0.1 * jax.random.normal(ks[7], (h,)),
        initial_state=jax.random.normal(ks[8], (b, h, p, n)),
    )
    seq_idx = jnp.zeros((b, l), jnp.int32).at[1, 16:].set(1).at[1, 21:].set(2)
    names = list(args)
    w = jax.random.normal(jax.random.key(3), (b, l, h, p))

    def loss(impl, *values):
        y, s = mj.ops.ssd(**dict(zip(names, values)), chunk_size=16, dt_softplus=True, dt_limit=(1e-3, 0.5),
                          seq_idx=seq_idx, return_final_state=True, impl=impl)
        return jnp.sum(y * w) + jnp.sum(s * s), (y, s)

    grad = lambda impl: jax.jit(jax.grad(lambda *v: loss(impl, *v), argnums=tuple(range(len(names))), has_aux=True))
    ref_grads, ref_out = grad("reference")(*args.values())
    for impl in ("chunked", "pallas"):
        for axes in (dict(tensor=2, sequence=4), dict(data=2, sequence=4)):
            mesh = mjs.make_mesh(**axes)
            with jax.set_mesh(mesh):
                grads, out = grad(impl)(*args.values())
                jaxpr = str(jax.make_jaxpr(lambda *v: loss(impl, *v))(*args.values()))
            print(json.dumps(dict(scan=f"ssd_{impl}", mesh=dict(mesh.shape), out_err=tree_rel(out, ref_out),
                                  grad_err=tree_rel(grads, ref_grads), shard_map="shard_map" in jaxpr)), flush=True)


def conv_rows():
    """causal_conv1d with time over sequence (the halo from the previous shard through a
    collective permute) against the unsharded convolution: outputs and every gradient,
    without and with packed documents (a boundary on a shard boundary, one just after
    it, a one-token document)."""
    b, l, d, k = 2, 32, 16, 4
    kx, kw, kb, kc = jax.random.split(jax.random.key(4), 4)
    x, w, bias = jax.random.normal(kx, (b, l, d)), jax.random.normal(kw, (k, d)), jax.random.normal(kb, (d,))
    docs = jnp.asarray(np.stack([np.repeat(np.arange(5), [8, 1, 7, 1, 15]), np.repeat(np.arange(2), [23, 9])]))
    cot = jax.random.normal(kc, (b, l, d))
    for seq_idx in (None, docs.astype(jnp.int32)):
        def loss(x, w, bias):
            y = mj.ops.causal_conv1d(x, w, bias, seq_idx=seq_idx)
            return jnp.sum(y * cot), y

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
        ref_grads, ref_out = grad(x, w, bias)
        for axes in (dict(sequence=8), dict(tensor=2, sequence=4)):
            mesh = mjs.make_mesh(**axes)
            with jax.set_mesh(mesh):
                grads, out = grad(x, w, bias)
                hlo = grad.lower(x, w, bias).as_text()
            print(json.dumps(dict(scan="conv_halo", docs=seq_idx is not None, mesh=dict(mesh.shape),
                                  out_err=tree_rel(out, ref_out), grad_err=tree_rel(grads, ref_grads),
                                  shard_map="collective_permute" in hlo)), flush=True)


QUICK = {"mamba": ["data2_fsdp2_tensor2", "fsdp2_tensor2_sequence2"], "hybrid": ["data2_fsdp2_tensor2"],
         "mamba2": ["fsdp2_tensor2_sequence2"]}


def main():
    assert len(jax.devices()) == 8, jax.devices()
    only = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--models=")]
    models = {m: kw for m, kw in MODELS.items() if not only or m in only[0].split(",")}
    if "--no-ops" not in sys.argv:
        scan_rows()
        ssd_rows()
        conv_rows()
    layouts = QUICK if "--quick" in sys.argv else {m: list(LAYOUTS) for m in MODELS}
    batch = batch_for(0)
    for model_name, kw in models.items():
        cfg = mj.MambaConfig(**kw)
        factory = lambda: mj.MambaLM(cfg, rngs=nnx.Rngs(0))
        loss0, gn0, params0, _ = step(factory(), batch)
        for layout in layouts[model_name]:
            axes = LAYOUTS[layout]
            mesh = mjs.make_mesh(**axes)
            model = mjs.init_sharded(factory, mesh)
            init_err = tree_rel(nnx.state(model, nnx.Param), nnx.state(factory(), nnx.Param))
            in_proj = model.layers[0].mixer.in_proj.kernel[...] if model_name != "hybrid" else model.embedding.embedding[...]
            shard_shape = in_proj.addressable_shards[0].data.shape
            split = shard_shape != in_proj.shape or all(v == 1 for k, v in mesh.shape.items() if k in ("fsdp", "tensor"))
            with jax.set_mesh(mesh):  # the scan runs under shard_map (sequence: prefix correction)
                loss, gn, params, opt_like_params = step(model, mjs.shard_batch(batch, mesh))
            row = dict(model=model_name, layout=layout, mesh=dict(mesh.shape), init_err=init_err,
                       loss_err=abs(loss - loss0) / abs(loss0), grad_norm_err=abs(gn - gn0) / abs(gn0),
                       param_err=tree_rel(params, params0), split=bool(split), shard_shape=list(shard_shape),
                       full_shape=list(in_proj.shape), opt_like_params=opt_like_params)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
