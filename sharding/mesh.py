"""Build a device mesh from `MeshConfig`, with clear errors when it cannot work.

Axes, outer to inner: stage, data, fsdp, context, expert, tensor (`MeshConfig.axis_names`).
One axis may be -1 and takes the devices the others leave. With any
`mesh.dcn_*` factor > 1 the mesh is hybrid: axis X spans `dcn_X` slices
(hosts / pods over the data-center network) times `X / dcn_X` devices within
a slice, laid out by `mesh_utils.create_hybrid_device_mesh` where the devices
know their slice (TPU multi-slice); elsewhere (CPU, one GPU host) the factors
are validated and the devices laid out in order, slice-major.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from ..errors import ConfigError


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """Resolved axis sizes (the -1 axis takes the rest) for `n_devices` devices."""
    sizes = dict(mesh_cfg.sizes)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if n_devices % fixed:
        raise ConfigError(
            f"mesh {_fmt(sizes)} needs a multiple of {fixed} devices, but there are {n_devices}")
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"mesh {_fmt(sizes)} uses {math.prod(sizes.values())} devices, but there are "
            f"{n_devices} (set one axis to -1 to take the rest)")
    for k, dcn in mesh_cfg.dcn_sizes.items():
        if sizes[k] % dcn:
            raise ConfigError(f"mesh.dcn_{k}={dcn} does not divide mesh.{k}={sizes[k]}")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    if mesh_cfg.devices:
        if mesh_cfg.devices > len(devices):
            raise ConfigError(f"mesh.devices={mesh_cfg.devices} but there are only {len(devices)}")
        if jax.process_count() > 1:
            raise ConfigError("mesh.devices selects a subset of devices, which only works in a "
                              "single-process run; set it to 0 for multi-host")
        devices = devices[:mesh_cfg.devices]
    sizes = mesh_shape(mesh_cfg, len(devices))
    dcn = tuple(mesh_cfg.dcn_sizes.values())
    if math.prod(dcn) > 1:
        ici = tuple(s // d for s, d in zip(sizes.values(), dcn))
        if all(hasattr(d, "slice_index") for d in devices):
            from jax.experimental import mesh_utils
            try:
                grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
            except (ValueError, AssertionError) as e:
                raise ConfigError(f"mesh dcn factors {_fmt(mesh_cfg.dcn_sizes)}: {e}") from None
            return Mesh(grid, tuple(sizes))
        # No slice information: lay the devices out slice-major, as a hybrid mesh would.
        grid = np.asarray(devices).reshape(dcn + ici)
        n = len(dcn)
        grid = grid.transpose([j for i in range(n) for j in (i, n + i)]).reshape(
            tuple(sizes.values()))
        return Mesh(grid, tuple(sizes))
    grid = np.asarray(devices).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def check_divisible(mesh, rules, named_dims: dict[str, int]):
    """Every logical dim sharded over mesh axes must divide by their size.

    `mesh` is a `Mesh` or a plain {axis: size} dict (planning without devices).
    """
    shape = mesh if isinstance(mesh, dict) else mesh.shape
    table = dict(rules)
    for logical, size in named_dims.items():
        axes = table.get(logical) or ()
        n = math.prod(shape[a] for a in axes)
        if size % n:
            raise ConfigError(
                f"{logical}={size} is sharded over mesh axes {'x'.join(axes)} of size {n}, "
                f"which does not divide it")


def model_dims(cfg) -> dict[str, int]:
    """The logical dims of `cfg` (a full Config) that the rules may shard."""
    m = cfg.model
    dims = {"batch": cfg.data.batch_size, "vocab": m.vocab_size, "heads": m.n_heads,
            "kv_heads": m.n_kv_heads, "mlp": m.d_ff, "embed": m.d_model, "layers": m.n_layers}
    if m.moe.n_experts:
        dims["experts"] = m.moe.n_experts
    return dims


def _fmt(sizes):
    return " x ".join(f"{k}={v}" for k, v in sizes.items())
