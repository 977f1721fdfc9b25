"""Shared test settings: strict dtype promotion, tolerances, the float64 oracle."""

import jax
import numpy as np
import pytest

# Any implicit mixing of dtypes (bf16 with f32, int with float) is a bug here.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Relative-error tolerances ||out - ref|| / ||ref||, per input dtype (DESIGN.md).
TOL = {"float32": 1e-5, "bfloat16": 2e-2}
GRAD_TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.all(np.isfinite(out)), "non-finite values in output"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def selective_scan_oracle(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None, as_float64=False
):
    """The recurrence written from the equations, step by step, in float64 NumPy.

    Inputs are read as float32 values (bf16 arrays included), or with
    ``as_float64`` taken as they are (float64 finite differences)."""
    if as_float64:
        f64 = lambda x: None if x is None else np.asarray(x, np.float64)
    else:
        f64 = lambda x: None if x is None else np.asarray(np.asarray(x, np.float32), np.float64)
    u, dt, A, B, C, D, z, bias, h = map(f64, (u, delta, A, B, C, D, z, delta_bias, initial_state))
    b, l, d = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    rep = d // B.shape[2]
    B, C = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)
    if bias is not None:
        dt = dt + bias
    if delta_softplus:
        dt = np.logaddexp(dt, 0.0)
    h = np.zeros((b, d, n)) if h is None else h
    ys = []
    for t in range(l):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t]
        ys.append(np.einsum("bdn,bdn->bd", h, C[:, t]))
    y = np.stack(ys, axis=1)
    if D is not None:
        y = y + u * D
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y, h


# --------------------------------------------------------------------------- attention and whole-model oracles


def _np64(x):
    return None if x is None else np.asarray(np.asarray(x, np.float32), np.float64)


def rope_oracle(x, positions, rotary_dim, base=10000.0):
    """RoPE, rotate-half (GPT-NeoX) convention, written per position in float64:
    dims ``i`` and ``i + rotary_dim / 2`` (``i < rotary_dim / 2``) turn by ``pos * base**(-2i / rotary_dim)``.
    ``x`` (b, l, heads, p), ``positions`` (b, l)."""
    x = np.array(x, np.float64)
    half = rotary_dim // 2
    out = x.copy()
    for bi in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                angle = positions[bi, t] * base ** (-2.0 * i / rotary_dim)
                a, b = x[bi, t, :, i], x[bi, t, :, i + half]
                out[bi, t, :, i] = a * np.cos(angle) - b * np.sin(angle)
                out[bi, t, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def attention_oracle(x, w_in, w_out, *, num_heads, num_heads_kv, rotary_dim, base=10000.0, b_in=None, b_out=None,
                     mask=None, conv_w=None, conv_b=None):
    """Causal self-attention from its definition, float64 NumPy: ``softmax(q k^T / sqrt(p)) v``
    over the keys at or before each query (and, with a left-padding ``mask``, real ones only),
    query head ``i`` using KV head ``i // (h / h_kv)`` (GQA), RoPE on the first ``rotary_dim``
    dims at the positions of the real tokens. ``w_in`` (e, (h + 2 h_kv) p), ``w_out`` (h p, e).
    With ``conv_w`` (k, (h + 2 h_kv) p) and ``conv_b``, the reference ``MHA(d_conv=k)``: the
    projection at time t becomes ``conv_b + sum_j conv_w[j] qkv[t - k + 1 + j]`` (zeros before
    the start and at padded steps)."""
    x, w_in, w_out, b_in, b_out, conv_w, conv_b = map(_np64, (x, w_in, w_out, b_in, b_out, conv_w, conv_b))
    b, l, _ = x.shape
    h, g = num_heads, num_heads_kv
    p = w_out.shape[0] // h
    mask = np.ones((b, l), bool) if mask is None else np.asarray(mask)
    qkv = x @ w_in + (0.0 if b_in is None else b_in)
    if conv_w is not None:
        qkv = np.where(mask[..., None], qkv, 0.0)
        k_taps = conv_w.shape[0]
        conv = np.zeros_like(qkv) + conv_b
        for t in range(l):
            for j in range(k_taps):
                if 0 <= t - k_taps + 1 + j:
                    conv[:, t] += conv_w[j] * qkv[:, t - k_taps + 1 + j]
        qkv = conv
    q = qkv[..., : h * p].reshape(b, l, h, p)
    k = qkv[..., h * p : (h + g) * p].reshape(b, l, g, p)
    v = qkv[..., (h + g) * p :].reshape(b, l, g, p)
    positions = np.cumsum(mask, axis=1) - 1
    q, k = rope_oracle(q, positions, rotary_dim, base), rope_oracle(k, positions, rotary_dim, base)
    k, v = np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)  # KV head of query head i: i // (h / g)
    out = np.zeros((b, l, h, p))
    for bi in range(b):
        for head in range(h):
            scores = q[bi, :, head] @ k[bi, :, head].T / np.sqrt(p)  # (l, l)
            allowed = np.tril(np.ones((l, l), bool)) & (mask[bi][None, :] | np.eye(l, dtype=bool))
            scores = np.where(allowed, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            out[bi, :, head] = probs @ v[bi, :, head]
    return out.reshape(b, l, h * p) @ w_out + (0.0 if b_out is None else b_out)


def _linear(params, x):
    y = x @ _np64(params["kernel"])
    return y + _np64(params["bias"]) if "bias" in params and params["bias"] is not None else y


def _rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * _np64(weight)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def mamba_mixer_oracle(params, x, config):
    """The Mamba-1 mixer (selective) from the reference's equations, float64."""
    d, n, r, k = config.d_inner, config.d_state, config.resolved_dt_rank, config.d_conv
    xz = _linear(params["in_proj"], x)
    u, z = xz[..., :d], xz[..., d:]
    w = _np64(params["conv1d"]["kernel"])  # (k, d): y[t] = bias + sum_j w[j] u[t - k + 1 + j]
    padded = np.concatenate([np.zeros((u.shape[0], k - 1, d)), u], axis=1)
    conv = sum(w[j] * padded[:, j : j + u.shape[1]] for j in range(k))
    if "bias" in params["conv1d"]:
        conv = conv + _np64(params["conv1d"]["bias"])
    u = _silu(conv)
    x_dbl = u @ _np64(params["x_proj"]["kernel"])
    dt, B, C = x_dbl[..., :r], x_dbl[..., r : r + n], x_dbl[..., r + n :]
    dt = dt @ _np64(params["dt_proj"]["kernel"])
    A = -np.exp(_np64(params["A_log"]))
    y, _ = selective_scan_oracle(u, dt, A, B, C, D=params["D"], z=z, delta_bias=params["dt_proj"]["bias"],
                                 delta_softplus=True)
    return _linear(params["out_proj"], y)


def lm_oracle(model, input_ids):
    """Logits (b, l, padded vocab) of a float32 :class:`mamba_jax.MambaLM` (Mamba, attention and
    MLP blocks) recomputed from its parameters in float64 NumPy, sharing no code with it."""
    from flax import nnx

    cfg = model.config
    params = nnx.to_pure_dict(nnx.state(model))
    hidden = _np64(params["embedding"]["embedding"])[np.asarray(input_ids)]
    residual = None
    for i in range(cfg.n_layer):
        layer = params["layers"][i]
        residual = hidden if residual is None else residual + hidden
        normed = _rms_norm(residual, layer["norm"]["weight"], cfg.norm_epsilon)
        if cfg.is_attention_layer(i):
            mixer = layer["mixer"]
            hidden = attention_oracle(
                normed, mixer["in_proj"]["kernel"], mixer["out_proj"]["kernel"],
                b_in=mixer["in_proj"].get("bias"), b_out=mixer["out_proj"].get("bias"),
                num_heads=cfg.attn_num_heads, num_heads_kv=cfg.resolved_attn_num_heads_kv,
                rotary_dim=cfg.resolved_attn_rotary_dim, base=float(cfg.attn_rope_base),
                conv_w=mixer["conv1d"]["kernel"] if cfg.attn_d_conv else None,
                conv_b=mixer["conv1d"]["bias"] if cfg.attn_d_conv else None,
            )
        else:
            hidden = mamba_mixer_oracle(layer["mixer"], normed, cfg)
        if cfg.d_intermediate > 0:
            residual = residual + hidden
            y, gate = np.split(_linear(layer["mlp"]["fc1"], _rms_norm(residual, layer["norm2"]["weight"], cfg.norm_epsilon)), 2, axis=-1)
            hidden = _linear(layer["mlp"]["fc2"], y * _silu(gate))
    hidden = _rms_norm(residual + hidden, params["norm_f"]["weight"], cfg.norm_epsilon)
    if cfg.tie_embeddings:
        return hidden @ _np64(params["embedding"]["embedding"]).T
    return hidden @ _np64(params["lm_head"]["kernel"])


# --------------------------------------------------------------------------- shared fixtures


def fan_in_normal(rng, shape):
    """Matrices N(0, 1/fan_in), vectors 1 + N(0, 0.01): activations of order one through every layer."""
    if len(shape) >= 2:
        return rng.standard_normal(shape) / np.sqrt(shape[0])
    return 1 + 0.1 * rng.standard_normal(shape)


def random_like(abstract, seed=0, fill=fan_in_normal):
    """A concrete copy of an abstract module or pytree skeleton (``nnx.eval_shape``), every array
    drawn by NumPy with ``fill(rng, shape)`` (integers: 1..999). Nothing is compiled: an eager
    ``MambaLM(...)`` init compiles every initialiser, seconds per shape on CPU."""
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(seed)

    def one(x):
        if np.issubdtype(x.dtype, np.integer):
            return jnp.asarray(rng.integers(1, 1000, x.shape).astype(x.dtype))
        return jnp.asarray(np.asarray(fill(rng, x.shape), np.float32), x.dtype)

    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(one, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def random_model(config, seed=0, *, dtype=None, param_dtype=None, fill=fan_in_normal):
    """A :class:`mamba_jax.MambaLM` skeleton filled by :func:`random_like` (the random checkpoint of a test)."""
    import jax.numpy as jnp
    from flax import nnx

    import mamba_jax as mj

    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: mj.MambaLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return random_like(abstract, seed, fill)


def teacher_forced_greedy(forward, prompts, steps, length, vocab):
    """Greedy continuations by repeated parallel forwards: each row right padded to ``length``
    (the model is causal, so the logits at the last real position do not see the padding);
    ``forward(ids (b, length) int32) -> logits``. Returns the new tokens of each prompt."""
    import jax.numpy as jnp

    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        ids = np.zeros((len(seqs), length), np.int32)
        for r, s in enumerate(seqs):
            assert len(s) <= length, (len(s), length)
            ids[r, : len(s)] = s
        logits = np.asarray(forward(jnp.asarray(ids)))
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(logits[r, len(s) - 1, :vocab])))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


@pytest.fixture(scope="module")
def print_measured(request):
    """Prints the module's ``MEASURED`` dict (parity errors) at the module's end (run with -s to see them)."""
    yield
    for k, v in sorted(request.module.MEASURED.items()):
        print(f"PARITY {k}: {v:.3e}")
