"""Reading and writing Hugging Face checkpoint directories (any family).

* `read_config(dir) -> dict`: `config.json`, with CheckpointErrors that say what
  is wrong.
* `CheckpointReader(dir, stack)`: the tensors of `model.safetensors` (any
  `*.safetensors`) or of the shards listed in `model.safetensors.index.json`,
  opened with `safetensors.safe_open(framework="numpy")` (no torch; bfloat16
  through ml_dtypes). `read(name, index)` reads only the slice `index` of one
  tensor (safetensors' `get_slice` reads lazily from the memory-mapped file).
* `write_checkpoint(dir, config, tensors)`: `config.json` + safetensors (sharded
  with an index past `max_shard_bytes`) written into a temporary directory next
  to `dir` and renamed at the end; refuses a `dir` that exists and is not empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy (safetensors' numpy loader needs it)
import numpy as np
from safetensors import safe_open

from ...errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ------------------------------------------------------------------ reading

def read_config(directory) -> dict:
    """The `config.json` of a checkpoint directory as a dict."""
    directory = pathlib.Path(os.fspath(directory))
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint dir {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {directory} (not a Hugging Face checkpoint)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return hf


def is_hf_checkpoint(path) -> bool:
    """A directory with an HF config.json naming a model_type."""
    config = pathlib.Path(os.fspath(path)) / CONFIG_FILE
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError, TypeError):
        return False



class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read by
    name and slice. Files are opened on first use and closed with `stack`.
    `used` collects the names resolved so far."""

    def __init__(self, directory, stack: contextlib.ExitStack):
        self.directory = pathlib.Path(os.fspath(directory))
        self._stack, self._open = stack, {}
        self.used: set[str] = set()
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.where = {k: self.directory / f for k, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for f in sorted(set(self.where.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index} lists {f.name}, which is missing")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                other = [p.name for p in self.directory.glob("*.bin")]
                raise CheckpointError(
                    f"no *.safetensors weights in {self.directory}"
                    + (f" (found {', '.join(other)}: re-save with safe_serialization=True)"
                       if other else ""))
            self.where = {k: f for f in files for k in self._file(f).keys()}

    def _file(self, path: pathlib.Path):
        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(
                    safe_open(str(path), framework="numpy"))
            except Exception as e:  # SafetensorError, OSError: a corrupt or truncated file
                raise CheckpointError(f"cannot read {path}: {e}") from None
        return self._open[path]

    def keys(self):
        return self.where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def resolve(self, names: Sequence[str], expected_shape: tuple) -> str:
        """The first of `names` in the checkpoint, checked to have `expected_shape`
        (metadata only: nothing is read)."""
        name = next((n for n in names if n in self.where), None)
        if name is None:
            raise CheckpointError(f"tensor {names[0]!r} is missing from the checkpoint in "
                                  f"{self.directory} (expected shape {list(expected_shape)})")
        try:
            found = tuple(self._file(self.where[name]).get_slice(name).get_shape())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.where[name]}: {e}") \
                from None
        if found != tuple(expected_shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(found)} in the checkpoint "
                                  f"but the config implies {list(expected_shape)}")
        self.used.add(name)
        return name

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (one contiguous slice per axis) of tensor `name`."""
        try:
            return self._file(self.where[name]).get_slice(name)[tuple(index)]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.where[name]}: {e}") \
                from None


# ------------------------------------------------------------------ writing

def write_checkpoint(directory, config: dict,
                     tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int | None = None, *, who: str = "save",
                     extra_files: Mapping[str, bytes] | None = None) -> pathlib.Path:
    """Write `config.json` + `tensors` as a checkpoint dir; returns it (absolute).

    tensors: a dict, or (name, array) pairs, consumed one at a time (a generator
    keeps at most one shard on the host). Past `max_shard_bytes` (None: never),
    they go into `model-0000k-of-0000n.safetensors` listed in
    `model.safetensors.index.json`. Refuses a directory that exists and is not
    empty; writes a temporary directory next to it and renames it at the end,
    leaving nothing behind on failure. `who` prefixes the errors. `extra_files`
    ({name: bytes}: the tokenizer, generation_config.json, ...) are written with them.
    """
    from safetensors.numpy import save_file
    target = pathlib.Path(os.fspath(directory)).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"{who}: {target} already exists and is not empty; "
                              "choose a new directory")
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        shards, current, size, total = [], {}, 0, 0

        def flush(shard: dict):
            path = tmp / f"part-{len(shards)}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            shards.append((path, list(shard)))

        for key, tensor in pairs:
            tensor = np.ascontiguousarray(tensor)
            if current and max_shard_bytes and size + tensor.nbytes > max_shard_bytes:
                flush(current)
                current, size = {}, 0
            current[key] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
        flush(current)
        del current
        if len(shards) == 1:
            shards[0][0].rename(tmp / WEIGHTS_FILE)
        else:
            weight_map = {}
            for k, (path, keys) in enumerate(shards):
                name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                path.rename(tmp / name)
                weight_map.update({key: name for key in keys})
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        try:
            os.replace(tmp, target)  # also replaces an empty directory (POSIX)
        except OSError as e:
            raise CheckpointError(f"{who}: cannot move the checkpoint into {target}: "
                                  f"{e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ------------------------------------------------------------------ trees

def named_leaves(tree, sep: str | None = "/"):
    """([(name, leaf)], treedef): names joined with `sep` ("layers/attn/q"), or the key
    tuples themselves when sep is None."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [tuple(k.key for k in path) for path, _ in flat]
    if sep is not None:
        names = [sep.join(str(k) for k in n) for n in names]
    return [(n, leaf) for n, (_, leaf) in zip(names, flat)], treedef


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "INDEX_FILE", "read_config", "is_hf_checkpoint",
           "CheckpointReader", "write_checkpoint", "named_leaves"]
