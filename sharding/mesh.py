"""Build a device mesh from `MeshConfig`, with clear errors when it cannot work."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.errors import ConfigError


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    sizes = {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
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
    grid = np.asarray(devices).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def check_divisible(mesh: Mesh, rules, named_dims: dict[str, int]):
    """Every logical dim sharded over mesh axes must divide by their size."""
    table = dict(rules)
    for logical, size in named_dims.items():
        axes = table.get(logical) or ()
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            raise ConfigError(
                f"{logical}={size} is sharded over mesh axes {'x'.join(axes)} of size {n}, "
                f"which does not divide it")


def _fmt(sizes):
    return " x ".join(f"{k}={v}" for k, v in sizes.items())
