"""Mesh (data, fsdp, tensor, expert) from config, and logical-axis -> mesh-axis rules for parameters.

Parameters are annotated with logical names where they are created (archs.layers.linear etc.);
this module is the only place that knows how those names map onto a mesh, so changing the
parallelism is a config edit.

Expert parallelism: routed-expert weights (logical axis 'experts') are split over the 'expert'
mesh axis; everything else is replicated over it and the batch is split over it, so the expert
axis is a data-parallel axis for the dense parts (the usual EP layout). The axis is last, so a
mesh with expert = 1 has exactly the devices of the former (data, fsdp, tensor) mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from archs.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (None: replicated)
RULES = {
    "embed": "fsdp",
    "embed2": None,
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "norm": None,
    "conv": None,
    "state": None,
    "experts": "expert",
    "router": None,
    "latent": None,
}


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int, int]:
    """(data, fsdp, tensor, expert); mesh.expert defaults to 1 where the config has no such key."""
    fsdp, tensor, expert = int(mesh_cfg.fsdp), int(mesh_cfg.tensor), int(getattr(mesh_cfg, "expert", 1))
    if fsdp < 1 or tensor < 1 or expert < 1:
        raise ConfigError(f"mesh.fsdp={fsdp}, mesh.tensor={tensor} and mesh.expert={expert} must be >= 1")
    rest = fsdp * tensor * expert
    data = int(mesh_cfg.data)
    if data == -1:
        if n_devices % rest:
            raise ConfigError(
                f"mesh.fsdp x mesh.tensor x mesh.expert = {rest} does not divide the {n_devices} available devices; "
                "choose factors of the device count"
            )
        data = n_devices // rest
    if data * rest != n_devices:
        raise ConfigError(
            f"mesh data x fsdp x tensor x expert = {data}x{fsdp}x{tensor}x{expert} = {data * rest} but {n_devices} "
            "devices are available; make the product equal the device count (data=-1 fills it in)"
        )
    return data, fsdp, tensor, expert


def batch_shards(shape: tuple[int, ...]) -> int:
    """Devices the batch is split over (data x fsdp x expert) for a mesh_shape result."""
    return int(np.prod([n for n, axis in zip(shape, MESH_AXES) if axis in BATCH_AXES]))


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def _spec_for(logical, shape, mesh: Mesh) -> P:
    axes = []
    for name, dim in zip(logical, shape):
        axis = RULES.get(name)
        # Uneven splits (e.g. a 259-token vocabulary over 2 devices) stay replicated.
        if axis is None or dim % mesh.shape[axis]:
            axes.append(None)
        else:
            axes.append(axis)
    return P(*axes)


def param_shardings(state: nnx.State, mesh: Mesh):
    """NamedSharding for every variable of a (possibly abstract) nnx.State."""
    logical = nnx.get_partition_spec(state)

    def one(spec, leaf):
        shape = getattr(leaf, "shape", ())
        names = tuple(spec) if spec is not None else ()
        if len(names) != len(shape):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _spec_for(names, shape, mesh))

    return jax.tree.map(one, logical, state, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
