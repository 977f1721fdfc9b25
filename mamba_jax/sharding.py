"""Meshes, logical-axis rules and sharded models, with JAX's own runtime.

Every parameter carries logical axis names (``embed``, ``mlp``, ``vocab``,
``state``, ``rank``, ``conv``, ``heads``; see ``mamba_jax.nn``). A rule table
maps each logical name to a mesh axis (or None: replicated along that
dimension); :func:`shard_model` places every parameter by its names with
``jax.device_put`` and a ``NamedSharding``, and :func:`init_sharded` builds a
model directly in that layout, so the full model never exists on one device.
The computation is then partitioned by XLA (``jax.jit`` propagates the
shardings): there is no distribution layer of our own.

Mesh axes (:func:`make_mesh`):

* ``data``      batch, parameters replicated;
* ``fsdp``      batch, and parameters split along their ``embed`` dimension
  (gathered per layer by XLA when used: fully-sharded data parallelism);
* ``tensor``    the inner channels (``mlp``), attention heads and the vocabulary;
* ``sequence``  the time axis of the batch.

The selective scan is the exception: a Mosaic or Triton kernel cannot be
partitioned by XLA, and a scan split over time needs the carried state of the
shards before it. Under a mesh set with ``jax.set_mesh(mesh)``,
``mamba_jax.ops.selective_scan`` runs every implementation through
:func:`sharded_selective_scan` (``shard_map``: channels over ``tensor``, batch
over ``data`` x ``fsdp``, time over ``sequence`` with the prefix correction).
``mamba_jax.ops.ssd`` (Mamba-2) does the same through :func:`sharded_ssd` (heads
over ``tensor``). Without ``jax.set_mesh``, XLA partitions the XLA
implementations by itself (gathering the time axis) and the Pallas kernels must
not be used on split inputs. Not built yet: the causal convolution's halo
exchange (XLA gathers it).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor", "sequence")

# Logical parameter axis -> mesh axis (None: replicated).
DEFAULT_RULES: Mapping[str, str | None] = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "state": None,
    "rank": None,
    "conv": None,
}

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, sequence: int = 1, *, devices=None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor", "sequence")``.

    Absent axes are 1; one axis may be -1: it takes the devices the others leave.
    The product must equal the number of devices (``jax.devices()`` by default).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "sequence": sequence}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"{name}={size!r} must be a positive int or -1")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices do not divide into the fixed axes' {fixed}: {sizes}")
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, there are {len(devices)}")
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _mesh_spec(logical: PartitionSpec, rules: Mapping[str, str | None]) -> PartitionSpec:
    out = []
    for name in logical:
        if name is None:
            out.append(None)
        elif name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(rules)}")
        else:
            out.append(rules[name])
    return PartitionSpec(*out)


def _check_divisible(path: str, shape, spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, axis) in enumerate(zip(shape, spec)):
        if axis is not None and size % mesh.shape[axis]:
            raise ValueError(
                f"parameter {path} has shape {tuple(shape)}: dimension {dim} ({size}) is not divisible by "
                f"mesh axis {axis!r} of size {mesh.shape[axis]}; change the mesh or the rules"
            )


def shardings(state, mesh: Mesh, rules: Mapping[str, str | None] | None = None):
    """The ``NamedSharding`` of every leaf of an NNX ``state`` (parameters by their
    logical names; other variables, such as RNG counters, replicated)."""
    rules = DEFAULT_RULES if rules is None else {**DEFAULT_RULES, **rules}
    specs = nnx.get_partition_spec(state)

    def one(path, leaf, spec):
        if not isinstance(spec, PartitionSpec):
            spec = PartitionSpec()
        mesh_spec = _mesh_spec(spec, rules)
        _check_divisible(jax.tree_util.keystr(path), np.shape(leaf), mesh_spec, mesh)
        return NamedSharding(mesh, mesh_spec)

    return jax.tree_util.tree_map_with_path(
        one, state, specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] | None = None) -> nnx.Module:
    """Places every variable of ``model`` on ``mesh`` by its logical axes (in place); returns it.

    ``rules`` override entries of :data:`DEFAULT_RULES`, e.g. ``{"embed": None}``
    to replicate instead of FSDP. A dimension that the chosen mesh axis does not
    divide is an error naming the parameter.
    """
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, shardings(state, mesh, rules)))
    return model


def init_sharded(factory, mesh: Mesh, rules: Mapping[str, str | None] | None = None) -> nnx.Module:
    """Builds ``factory()`` (e.g. ``lambda: MambaLM(cfg, rngs=nnx.Rngs(0))``) directly in
    its sharded layout: the shapes come from ``nnx.eval_shape``, the values from one
    ``jax.jit`` whose out shardings place each parameter, so no device ever holds
    the whole model. The values equal ``shard_model(factory(), mesh)``'s."""
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    out = shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(factory())[1], out_shardings=out)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch over ``data`` x ``fsdp``, time over ``sequence``, the rest replicated."""
    if ndim < 1:
        raise ValueError(f"{ndim=} must be at least 1 (the batch dimension)")
    spec = [BATCH_AXES] + (["sequence"] if ndim >= 2 else []) + [None] * (ndim - 2)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _check_batch_divisible(name: str, shape, sharding: NamedSharding, mesh) -> None:
    for dim, axes in enumerate(sharding.spec):
        if axes is None:
            continue
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if shape[dim] % size:
            raise ValueError(
                f"batch[{name!r}] has shape {tuple(shape)}: dimension {dim} ({shape[dim]}) is not "
                f"divisible by {axes} of size {size}"
            )


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a global batch of ``global_batch_size`` that this process holds
    under :func:`batch_sharding` (``range(global_batch_size)`` in a single process).

    In a multi-process run every process loads only these rows (all of them when the
    batch axes do not cross processes) and passes them to :func:`shard_batch`. An
    error says so when the process's rows are not one contiguous block (a mesh built
    from a device order that interleaves processes: use :func:`make_mesh`)."""
    n_blocks = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if not isinstance(global_batch_size, int) or global_batch_size < 1 or global_batch_size % n_blocks:
        raise ValueError(f"{global_batch_size=} must be a positive multiple of data x fsdp = {n_blocks}")
    sharding = batch_sharding(mesh, 1)
    index = sharding.addressable_devices_indices_map((global_batch_size,))
    starts = sorted({sl[0].start or 0 for sl in index.values()})
    size = global_batch_size // n_blocks
    lo, hi = starts[0], starts[-1] + size
    if [lo + i * size for i in range(len(starts))] != starts:
        raise ValueError(
            f"process {jax.process_index()} holds batch blocks starting at {starts} of a batch of "
            f"{global_batch_size}: not one contiguous block (build the mesh with make_mesh)"
        )
    return slice(lo, hi)


def shard_batch(batch: Mapping[str, jax.Array], mesh: Mesh) -> dict:
    """Places a dict of (b, l, ...) arrays: b over data x fsdp, l over sequence.

    b must be divisible by ``data * fsdp`` and l by ``sequence``; an error names
    the array otherwise. In a multi-process run (``jax.distributed``) each process
    passes only its rows of the global batch (:func:`process_rows`) as host arrays,
    with every column; the global array is assembled with
    ``jax.make_array_from_process_local_data``, without any process holding all of it.
    """
    out = {}
    multi = jax.process_count() > 1
    for name, x in batch.items():
        if not multi:
            x = jax.numpy.asarray(x)
            sharding = batch_sharding(mesh, x.ndim)
            _check_batch_divisible(name, x.shape, sharding, mesh)
            out[name] = jax.device_put(x, sharding)
            continue
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        n_blocks = math.prod(mesh.shape[a] for a in BATCH_AXES)
        local = process_rows(mesh, n_blocks)  # the fraction of the rows this process holds
        rows, extra = divmod(x.shape[0] * n_blocks, local.stop - local.start)
        if extra:
            raise ValueError(
                f"batch[{name!r}] has {x.shape[0]} rows on process {jax.process_index()}, which holds "
                f"{local.stop - local.start} of data x fsdp = {n_blocks} batch blocks"
            )
        global_shape = (rows, *x.shape[1:])
        _check_batch_divisible(name, global_shape, sharding, mesh)
        out[name] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out


def replicate(x, mesh: Mesh) -> jax.Array:
    """``x`` (the same value on every process, a typed PRNG key too) replicated over ``mesh``,
    in a multi-process run as well (where ``jax.device_put`` refuses devices of other processes)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if jax.numpy.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(replicate(jax.random.key_data(x), mesh), impl=jax.random.key_impl(x))
    data = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, data, data.shape)


def place_state(state, mesh: Mesh):
    """Every leaf of a pytree on ``mesh``: a leaf already carrying a ``NamedSharding`` of
    this mesh keeps it, any other (an optimizer's step count, RNG counters) is replicated.
    Returns ``(placed, shardings)``; the shardings are the jitted step's in/out shardings."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return s
        return replicated

    shardings_ = jax.tree.map(one, state)
    return jax.device_put(state, shardings_), shardings_


# --------------------------------------------------------------------------
# The selective scan under a mesh
# --------------------------------------------------------------------------


def active_mesh():
    """The mesh set with ``jax.set_mesh`` when it has this module's axes, else None
    (also inside a ``shard_map`` over them, where the arrays are already per shard)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names) or set(AXES) & set(mesh.manual_axes):
        return None
    return mesh


def _shard_map_present(body, args, in_specs, out_specs):
    """``jax.shard_map`` of ``body(*args)`` where absent optional inputs are None: only the
    present ones are mapped (with their ``in_specs``), and ``body`` gets the full tuple back
    with None in the absent places.

    ``check_vma=False``: the implementations' loop carries are not annotated with the axes
    they vary over; without the check, shard_map's transpose sums the cotangents of the
    replicated inputs (A, D, biases, conv kernels, ...) over the axes they are replicated on.
    """
    present = [i for i, a in enumerate(args) if a is not None]

    def mapped(*local):
        full = [None] * len(args)
        for i, a in zip(present, local):
            full[i] = a
        return body(*full)

    return jax.shard_map(
        mapped, in_specs=tuple(in_specs[i] for i in present), out_specs=out_specs, check_vma=False
    )(*(args[i] for i in present))


def sharded_selective_scan(scan_fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, keep=None):
    """``scan_fn`` (any implementation: ``(y, final_state) = scan_fn(u, delta, A, B, C, D, z,
    delta_bias, delta_softplus, initial_state, keep)``, B and C grouped (b, l, g, n); ``keep``
    the (b, l) continuation mask of packed documents or None) run under
    ``shard_map`` on the active mesh:

    * batch over ``data`` x ``fsdp``, channels over ``tensor`` (no communication:
      channels are independent; B and C follow when their groups split evenly,
      otherwise they must have a single group and are replicated);
    * time over ``sequence`` (when it divides l; otherwise, e.g. a one-token step,
      time is replicated) with the prefix correction: every shard scans from a
      zero state for its final state ``H`` and computes its decay product
      ``P = exp(A sum_t dt_t)``; the (P, H) pairs are gathered and folded in shard
      order into each shard's true initial state, with which it scans again. Exact,
      at twice the scan's work; autodiff transposes the gather, so the backward sums
      the state cotangents across shards.

    Mosaic and Triton kernels cannot be partitioned by XLA, so this is how they
    run under a mesh; the XLA implementations take the same path.
    """
    from jax.sharding import PartitionSpec as P

    mesh = active_mesh()
    b, l, d = u.shape
    g = B.shape[2]
    tensor = mesh.shape["tensor"]
    # Time and batch are split only when they divide evenly (a one-token decode step
    # or a batch of one is replicated over those axes instead; channels always split).
    seq = mesh.shape["sequence"] if l % mesh.shape["sequence"] == 0 else 1
    batch_axes = BATCH_AXES if b % math.prod(mesh.shape[a] for a in BATCH_AXES) == 0 else None
    time_axis = "sequence" if seq > 1 else None
    if d % tensor:
        raise ValueError(f"selective_scan under a mesh: channels d={d} are not divisible by tensor={tensor}")
    if g > 1 and g % tensor:
        raise ValueError(f"selective_scan under a mesh: groups g={g} must be divisible by tensor={tensor} (or be 1)")
    group_axis = "tensor" if g > 1 else None
    spec = {
        "seq": P(batch_axes, time_axis, "tensor"),
        "bc": P(batch_axes, time_axis, group_axis, None),
        "A": P("tensor", None),
        "vec": P("tensor"),
        "state": P(batch_axes, "tensor", None),
        "time": P(batch_axes, time_axis),
    }
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, keep)
    kinds = ("seq", "seq", "A", "bc", "bc", "vec", "seq", "vec", "state", "time")

    def body(u_, delta_, A_, B_, C_, D_, z_, bias_, h0_, keep_):
        if seq == 1:
            return scan_fn(u_, delta_, A_, B_, C_, D_, z_, bias_, delta_softplus, h0_, keep_)
        _, H = scan_fn(u_, delta_, A_, B_, C_, None, None, bias_, delta_softplus, None, keep_)
        dt = delta_.astype(jax.numpy.float32)
        if bias_ is not None:
            dt = dt + bias_.astype(jax.numpy.float32)
        if delta_softplus:
            dt = jax.nn.softplus(dt)
        decay = jax.numpy.exp(A_.astype(jax.numpy.float32) * dt.sum(1)[..., None])  # (b, d, n)
        if keep_ is not None:  # a document starting in this shard drops everything before it
            decay = decay * keep_.prod(1)[:, None, None]
        all_decay = jax.lax.all_gather(decay, "sequence")
        all_H = jax.lax.all_gather(H, "sequence")
        h = jax.numpy.zeros_like(H) if h0_ is None else h0_.astype(jax.numpy.float32)
        starts = [h]
        for r in range(seq - 1):
            h = all_decay[r] * h + all_H[r]
            starts.append(h)
        index = jax.lax.axis_index("sequence")
        y, hT = scan_fn(u_, delta_, A_, B_, C_, D_, z_, bias_, delta_softplus, jax.numpy.stack(starts)[index], keep_)
        hT = jax.lax.psum(jax.numpy.where(index == seq - 1, hT, 0.0), "sequence")
        return y, hT

    return _shard_map_present(body, args, [spec[k] for k in kinds], (spec["seq"], spec["state"]))


def sharded_causal_conv1d(conv_fn, x, kernel, bias, seq_idx):
    """``conv_fn`` (:func:`mamba_jax.ops.causal_conv1d`, with its ``conv_state`` argument) run
    under ``shard_map`` on the active mesh with time split over ``sequence``: each shard
    takes the last ``k - 1`` inputs of the previous shard (its halo) through one
    ``lax.ppermute`` and continues from them as from a conv state; the first shard
    gets zeros. With ``seq_idx`` the halo's document ids travel too, and halo inputs
    of another document than the shard's first one are zeroed, so nothing crosses a
    document boundary at a shard boundary either. Batch over ``data`` x ``fsdp``,
    channels over ``tensor`` when they divide (otherwise replicated). Without this,
    XLA would gather the whole time axis around the convolution.

    Returns ``y`` (b, l, d), or None when the mesh does not split time here (no
    ``sequence`` axis, l not divisible, or shards shorter than the halo): the caller
    then runs ``conv_fn`` as it is.
    """
    from jax.sharding import PartitionSpec as P

    mesh = active_mesh()
    b, l, d = x.shape
    k = kernel.shape[0]
    seq = mesh.shape["sequence"]
    if seq == 1 or l % seq or l // seq < k - 1 or k == 1:
        return None
    batch_axes = BATCH_AXES if b % math.prod(mesh.shape[a] for a in BATCH_AXES) == 0 else None
    chan = "tensor" if d % mesh.shape["tensor"] == 0 else None
    args = (x, kernel, bias, seq_idx)
    specs = (P(batch_axes, "sequence", chan), P(None, chan), P(chan), P(batch_axes, "sequence"))
    shift = [(i, i + 1) for i in range(seq - 1)]  # shard i sends to i + 1; shard 0 receives zeros

    def body(x_, w_, b_, s_):
        halo = jax.lax.ppermute(x_[:, -(k - 1) :], "sequence", shift)
        if s_ is not None:
            halo_doc = jax.lax.ppermute(s_[:, -(k - 1) :], "sequence", shift)
            same = (halo_doc == s_[:, :1])[..., None]
            halo = jax.numpy.where(same, halo, jax.numpy.zeros_like(halo))
        y, _ = conv_fn(x_, w_, b_, halo, s_)
        return y

    return _shard_map_present(body, args, specs, specs[0])


def sharded_ssd(ssd_fn, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, *, chunk_size, dt_softplus, dt_limit, impl):
    """``mamba_jax.ops.ssd`` (passed as ``ssd_fn``) under ``shard_map`` on the active mesh:
    heads over ``tensor`` (no communication; B and C follow when their groups split
    evenly, a single group is replicated), batch over ``data`` x ``fsdp``, time over
    ``sequence`` with the prefix correction: every shard runs from a zero state for its
    final state ``H`` (b, h, p, n) and its decay product per head ``P = exp(A_h sum_t dt_t)``
    (0 when a document starts inside the shard or at its first token); the (P, H) pairs
    are gathered and folded in shard order into each shard's initial state, with which it
    runs again (exact, twice the work; autodiff transposes the gather, so the backward
    sums the state cotangents across shards). Time or batch that a mesh axis does not
    divide (a one-token step, a batch of one) is replicated over that axis instead.
    """
    from jax.sharding import PartitionSpec as P

    from mamba_jax.ops.ssd import _process_dt

    mesh = active_mesh()
    b, l, h, _ = x.shape
    g = B.shape[2]
    tensor = mesh.shape["tensor"]
    seq = mesh.shape["sequence"] if l % mesh.shape["sequence"] == 0 else 1
    batch_axes = BATCH_AXES if b % math.prod(mesh.shape[a] for a in BATCH_AXES) == 0 else None
    time_axis = "sequence" if seq > 1 else None
    if h % tensor:
        raise ValueError(f"ssd under a mesh: heads h={h} are not divisible by tensor={tensor}")
    if g > 1 and g % tensor:
        raise ValueError(f"ssd under a mesh: groups g={g} must be divisible by tensor={tensor} (or be 1)")
    keep = None
    if seq > 1 and seq_idx is not None:  # 1 where a token continues the document before it
        same = (seq_idx[:, 1:] == seq_idx[:, :-1]).astype(jax.numpy.float32)
        keep = jax.numpy.concatenate([jax.numpy.ones((b, 1), jax.numpy.float32), same], axis=1)
    head = P("tensor") if D is None or D.ndim == 1 else P("tensor", None)
    specs = (
        P(batch_axes, time_axis, "tensor", None), P(batch_axes, time_axis, "tensor"), P("tensor"),
        P(batch_axes, time_axis, "tensor" if g > 1 else None, None), P(batch_axes, time_axis, "tensor" if g > 1 else None, None),
        head, P(batch_axes, time_axis, "tensor", None), P("tensor"), P(batch_axes, "tensor", None, None),
        P(batch_axes, time_axis), P(batch_axes, time_axis),
    )
    args = (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, keep)

    def run(x_, dt_, A_, B_, C_, D_, z_, bias_, h0_, sidx_):
        return ssd_fn(x_, dt_, A_, B_, C_, chunk_size=chunk_size, D=D_, z=z_, dt_bias=bias_, dt_softplus=dt_softplus,
                      dt_limit=dt_limit, initial_state=h0_, seq_idx=sidx_, return_final_state=True, impl=impl)

    def body(x_, dt_, A_, B_, C_, D_, z_, bias_, h0_, sidx_, keep_):
        if seq == 1:
            return run(x_, dt_, A_, B_, C_, D_, z_, bias_, h0_, sidx_)
        _, H = run(x_, dt_, A_, B_, C_, None, None, bias_, None, sidx_)
        f32 = jax.numpy.float32
        steps = _process_dt(dt_, bias_, dt_softplus, dt_limit).astype(f32)  # (b, l, h)
        decay = jax.numpy.exp(A_.astype(f32) * steps.sum(1))  # (b, h)
        if keep_ is not None:
            decay = decay * keep_.prod(1)[:, None]
        all_decay = jax.lax.all_gather(decay, "sequence")
        all_H = jax.lax.all_gather(H, "sequence")
        state = jax.numpy.zeros_like(H) if h0_ is None else h0_.astype(f32)
        starts = [state]
        for r in range(seq - 1):
            state = all_decay[r][:, :, None, None] * state + all_H[r]
            starts.append(state)
        index = jax.lax.axis_index("sequence")
        start = jax.numpy.stack(starts)[index]
        if keep_ is not None:  # this shard's first token starts a new document
            start = start * keep_[:, 0][:, None, None, None]
        y, hT = run(x_, dt_, A_, B_, C_, D_, z_, bias_, start, sidx_)
        hT = jax.lax.psum(jax.numpy.where(index == seq - 1, hT, 0.0), "sequence")
        return y, hT

    return _shard_map_present(body, args, specs, (specs[0], specs[8]))
