"""Device mesh and shardings, the batch/device policy, and multi-host initialisation.

The mesh has two axes, "data" and "fsdp" (`make_mesh`; default all devices on "data"). Batches are sharded
on their leading axis over both axes (every device holds batch_size / devices rows); the train state is
sharded over "fsdp" leaf by leaf (`fsdp_sharding`: each large enough array along its largest dimension that
"fsdp" divides, everything else replicated). Under `jax.jit` with these shardings XLA inserts the collectives:
parameters are all-gathered for the forward and backward pass and gradients reduce-scattered (fully sharded
data parallelism, ZeRO-3; Rajbhandari et al. 2020), or all-reduced when fsdp = 1.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdiff.config.schema import MESH_AXES, ConfigError, parse_mesh

DATA_AXIS, FSDP_AXIS = MESH_AXES

# Per-model overrides of the largest-dimension rule: (regular expression searched in the leaf path, e.g.
# "opt_state/0/mu/down_0_res_0/conv_0/kernel", axis to shard or None to replicate); the first match wins.
# Convolution kernels (kh, kw, in, out) are split over their output channels: in the U-Net's decoder
# the input channels are a concatenation (skip connection) and the largest-dimension rule would split them
# there but over the outputs elsewhere; one layout for every kernel keeps the all-gathers alike.
FSDP_RULES: Mapping[str, tuple[tuple[str, Optional[int]], ...]] = {"UNet": ((r"(conv\w*|shortcut)/kernel$", -1),)}


def mesh_shape(spec: "str | Mapping[str, int] | None", num_devices: int) -> tuple[int, int]:
    """(D, F) of a mesh spec ("data=D,fsdp=F"; a dict {"data": D, "fsdp": F}; an axis left out or -1 takes the
    devices left; None: all devices on data) for `num_devices` devices. ConfigError (one line) unless
    D * F = num_devices."""
    shape = parse_mesh(spec) if isinstance(spec, str) else {DATA_AXIS: -1, FSDP_AXIS: 1, **(spec or {})}
    text = spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in shape.items())
    d, f = shape[DATA_AXIS], shape[FSDP_AXIS]
    if d == -1 and f == -1:
        d, f = num_devices, 1
    elif d == -1 and num_devices % f == 0:
        d = num_devices // f
    elif f == -1 and num_devices % d == 0:
        f = num_devices // d
    if d < 1 or f < 1 or d * f != num_devices:
        got = "does not divide" if min(d, f) < 1 else f"has {d * f} devices, not"
        raise ConfigError(f"run.mesh {text} {got} the {num_devices} devices of this run; {mesh_hint(num_devices)}")
    return d, f


def mesh_hint(num_devices: int) -> str:
    """What to pass instead of a mesh that does not fit `num_devices` (each suggestion once)."""
    options = ["--run.mesh none (all devices on data)"]
    if num_devices > 1:
        options += [f"--run.mesh data={num_devices},fsdp=1", f"--run.mesh data=1,fsdp={num_devices}"]
    return f"data*fsdp must equal {num_devices}: pass " + " or ".join(options)


def make_mesh(devices: Optional[Sequence[Any]] = None, shape: "str | Mapping[str, int] | None" = None) -> Mesh:
    """Mesh with axes ("data", "fsdp") over `devices` (default: all devices of all processes) of `shape`
    (see `mesh_shape`; default: all on "data"). The devices keep their order (process-major), laid out by
    `mesh_utils.create_device_mesh` where the platform has a physical topology (TPU)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device")
    d, f = mesh_shape(shape, len(devs))
    grid = np.asarray(devs, dtype=object).reshape(d, f)
    if devs[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh((d, f), devs)
        except (ValueError, NotImplementedError, AssertionError):  # a subset of a slice: keep the given order
            pass
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every axis of the mesh (each device holds batch / devices rows)."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp: int, *, min_size: int = 2**14, axis: "int | None | str" = "largest") -> P:
    """PartitionSpec of one array of `shape` on a mesh whose "fsdp" axis has `fsdp` devices: split along `axis`
    ("largest": the largest dimension that fsdp divides, the last one on a tie; None: replicated). Arrays with
    fewer than `min_size` elements, scalars, and arrays with no divisible dimension are replicated."""
    if fsdp == 1 or axis is None or len(shape) == 0 or math.prod(shape) < min_size:
        return P()
    if axis == "largest":
        divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
        if not divisible:
            return P()
        axis = max(divisible, key=lambda i: (shape[i], i))
    axis = axis % len(shape)
    if shape[axis] % fsdp:
        return fsdp_spec(shape, fsdp, min_size=min_size)  # the rule does not fit this array: the general rule
    return P(*([None] * axis), FSDP_AXIS)


def leaf_path(path: Sequence[Any]) -> str:
    """ "params/blocks_0/attn/qkv/kernel" for a `jax.tree_util` key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fsdp_sharding(
    tree: Any, mesh: Mesh, *, min_size: int = 2**14, rules: Sequence[tuple[str, Optional[int]]] = ()
) -> Any:
    """A NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs: parameters, EMA, optimizer
    state, ...): `fsdp_spec` of its shape, with the first of `rules` ((regex, axis or None)) whose regex is
    found in its `leaf_path` choosing the axis. Leaves of the same shape and path tail (a parameter, its
    EMA and its Adam moments) get the same sharding, so element-wise updates need no communication."""
    fsdp = mesh.shape[FSDP_AXIS] if FSDP_AXIS in mesh.shape else 1
    compiled = [(re.compile(r), a) for r, a in rules]

    def one(path, x):
        axis: "int | None | str" = "largest"
        name = leaf_path(path)
        for regex, a in compiled:
            if regex.search(name):
                axis = a
                break
        return NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size=min_size, axis=axis))

    return jax.tree_util.tree_map_with_path(one, tree)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (arrays, or ShapeDtypeStructs with shardings; the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(np.shape(x))
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def check_batch_size(
    global_batch_size: int, devices: "int | Mesh", *, flag: str = "--batch_size", grad_accum: int = 1
) -> None:
    """The one batch policy of jdiff's tools: a global batch that a user chose must split evenly over the
    devices (training, and sampling with an explicit batch size), and with gradient accumulation over K
    micro-batches each micro-batch too (batch a multiple of K x devices); ValueError naming `flag` with the
    nearest valid value otherwise. Where jdiff chooses the batch itself (sampling's default), it picks a
    multiple."""
    n = devices if isinstance(devices, int) else devices.devices.size
    m = n * grad_accum
    if global_batch_size < 1 or global_batch_size % m:
        what = f"grad_accum x devices ({grad_accum} x {n})" if grad_accum > 1 else f"the number of devices ({n})"
        raise ValueError(
            f"batch_size={global_batch_size} must be a positive multiple of {what}; "
            f"e.g. use {flag} {max(m, global_batch_size // m * m)}"
        )


def local_copy(tree: Any) -> Any:
    """A global pytree as single-device arrays on this process's first addressable device (for host-local
    work such as sampling a preview grid without cross-host collectives). Sharded arrays are gathered first:
    that is a collective, so with sharded leaves every process must call it."""
    leaves, treedef = jax.tree.flatten(tree)
    sharded = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 and not x.is_fully_replicated
    ]
    if sharded:
        xs = [leaves[i] for i in sharded]
        full = jax.jit(lambda a: a, out_shardings=[NamedSharding(x.sharding.mesh, P()) for x in xs])(xs)
        for i, x in zip(sharded, full):
            leaves[i] = x

    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return x.addressable_data(0)
        return x

    return jax.tree.unflatten(treedef, [one(x) for x in leaves])


AUTO = "auto"  # --coordinator_address auto: jax.distributed.initialize() detects the cluster


def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None
) -> bool:
    """Calls `jax.distributed.initialize` when a coordinator address is given (argument or env var
    JDIFF_COORDINATOR_ADDRESS, with JDIFF_NUM_PROCESSES / JDIFF_PROCESS_ID). Must run before any other JAX
    call. Returns whether it initialised.

    The address "auto" lets JAX detect the cluster and fill in what is not given: Cloud TPU pods (one command
    per host), SLURM (`srun`: SLURM_PROCID, SLURM_NTASKS, the first node of SLURM_STEP_NODELIST), Open MPI
    and Kubernetes; ValueError (one line) when none is detected. On CPU it selects the gloo collectives so
    that cross-process all-reduces work. JAX's preemption notifier is turned off: it would take SIGTERM from
    the Python handler through which `jdiff.training.stops` makes every process stop at the same step."""
    addr = coordinator_address or os.environ.get("JDIFF_COORDINATOR_ADDRESS")
    if not addr:
        return False
    n = num_processes if num_processes is not None else _env_int("JDIFF_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JDIFF_PROCESS_ID")
    if addr != AUTO and (n is None or pid is None):
        raise ValueError(
            "--coordinator_address needs --num_processes and --process_id (or JDIFF_NUM_PROCESSES / "
            "JDIFF_PROCESS_ID), or is 'auto' on a TPU pod or under SLURM"
        )
    if n is not None and n < 1:
        raise ValueError(f"num_processes must be >= 1, got {n}")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ValueError(f"process_id must be in [0, {n}), got {pid}")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - option absent in some builds; GPUs/TPUs do not need it
        pass
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(coordinator_address=None if addr == AUTO else addr, num_processes=n, process_id=pid)
    except ValueError as e:
        if addr != AUTO:
            raise
        raise ValueError(
            f"--coordinator_address auto found no cluster (Cloud TPU pod, SLURM srun, Open MPI, Kubernetes): {e} "
            "Pass HOST:PORT with --num_processes and --process_id"
        ) from None
    return True


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None
