"""Reading and writing Hugging Face checkpoint directories; shared by the family
modules (`hf` decoder-only, `hf_bert`, `hf_t5`), which keep their own name tables.

* `read_config(dir) -> dict`: `config.json`, with CheckpointErrors that say what
  is wrong.
* `CheckpointReader(dir, stack)`: the tensors of `model.safetensors` (any
  `*.safetensors`) or of the shards listed in `model.safetensors.index.json`,
  opened with `safetensors.safe_open(framework="numpy")` (no torch; bfloat16
  through ml_dtypes) and read one at a time, shape-checked before reading.
* `write_checkpoint(dir, config, tensors)`: `config.json` + safetensors (sharded
  with an index past `max_shard_bytes`) written into a temporary directory next
  to `dir` and renamed at the end; refuses a `dir` that exists and is not empty.
* `Rule`, `load_leaf`, `export_leaf`: the simple mapping of BERT and T5 (one HF
  tensor per leaf or per layer of a stacked leaf; Linear weights transposed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy (safetensors' numpy loader needs it)
import numpy as np

from jaxlm.errors import CheckpointError

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


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read one
    at a time. Files are opened on first use and closed with `stack`.

    aliases(key) -> the names `key` may have in a checkpoint, tried in order
    (default: just `key`). `used` collects the names read so far.
    """

    def __init__(self, directory, stack: contextlib.ExitStack,
                 aliases: Callable[[str], list[str]] | None = None):
        from safetensors import safe_open
        self._dir = pathlib.Path(os.fspath(directory))
        self._stack, self._safe_open, self._open = stack, safe_open, {}
        self._aliases = aliases or (lambda key: [key])
        self.used: set[str] = set()
        index = self._dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.where = {k: self._dir / f for k, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for f in sorted(set(self.where.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index} lists {f.name}, which is missing")
        else:
            files = sorted(self._dir.glob("*.safetensors"))
            if not files:
                other = [p.name for p in self._dir.glob("*.bin")]
                raise CheckpointError(
                    f"no *.safetensors weights in {self._dir}"
                    + (f" (found {', '.join(other)}: re-save with safe_serialization=True)"
                       if other else ""))
            self.where = {k: f for f in files for k in self._file(f).keys()}

    def _file(self, path: pathlib.Path):
        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(
                    self._safe_open(str(path), framework="numpy"))
            except Exception as e:  # SafetensorError, OSError: a corrupt or truncated file
                raise CheckpointError(f"cannot read {path}: {e}") from None
        return self._open[path]

    def keys(self):
        return self.where.keys()

    def __contains__(self, key: str) -> bool:
        return any(name in self.where for name in self._aliases(key))

    def shape_error(self, name: str, found: tuple, expected: tuple) -> str:
        return (f"tensor {name!r} has shape {list(found)} in the checkpoint but the config "
                f"implies {list(expected)}")

    def read(self, key: str, expected_shape: tuple, part: tuple | None = None) -> np.ndarray:
        """Tensor `key` (or an alias), which must have `expected_shape` in the file; with
        part=(axis, index, count) only chunk `index` of `count` equal chunks along axis."""
        name = next((n for n in self._aliases(key) if n in self.where), None)
        if name is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self._dir} "
                                  f"(expected shape {list(expected_shape)})")
        f = self._file(self.where[name])
        try:
            view = f.get_slice(name)
            found = tuple(view.get_shape())
            if found != tuple(expected_shape):
                raise CheckpointError(self.shape_error(name, found, tuple(expected_shape)))
            self.used.add(name)
            if part is None:
                return f.get_tensor(name)
            axis, index, count = part
            size = found[axis] // count
            where = [slice(None)] * len(found)
            where[axis] = slice(index * size, (index + 1) * size)
            return view[tuple(where)]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.where[name]}: {e}") \
                from None


# ------------------------------------------------------------------ writing

def write_checkpoint(directory, config: dict,
                     tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int | None = None, *, who: str = "save") -> pathlib.Path:
    """Write `config.json` + `tensors` as a checkpoint dir; returns it (absolute).

    tensors: a dict, or (name, array) pairs, consumed one at a time (a generator
    keeps at most one shard on the host). Past `max_shard_bytes` (None: never),
    they go into `model-0000k-of-0000n.safetensors` listed in
    `model.safetensors.index.json`. Refuses a directory that exists and is not
    empty; writes a temporary directory next to it and renames it at the end,
    leaving nothing behind on failure. `who` prefixes the errors.
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


# ------------------------------------------------------------------ simple tables (BERT, T5)

class Rule(NamedTuple):
    """One leaf of our tree <-> one HF tensor (per layer where `key` holds "{i}": the
    leaf is stacked on axis 0).

    n_in > 0: an HF Linear weight [out, in] whose `in` is our first n_in axes (ours
    are [in..., out...]); flat: HF holds it flattened (the [H, hd] attention biases).
    """
    key: str
    n_in: int = 0
    flat: bool = False

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def hf_shape(self, shape: tuple) -> tuple:
        """Shape of the HF tensor of one (layer's) leaf of `shape`."""
        if self.n_in:
            return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
        return (math.prod(shape),) if self.flat else tuple(shape)

    def to_ours(self, a: np.ndarray, shape: tuple) -> np.ndarray:
        return (a.T if self.n_in else a).reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.n_in:
            return x.reshape(math.prod(x.shape[:self.n_in]), -1).T
        return x.reshape(-1) if self.flat else x


def load_leaf(reader: CheckpointReader, rule: Rule, spec: jax.ShapeDtypeStruct) -> jax.Array:
    """The leaf `spec` read through `rule`, cast to its dtype; one host buffer."""
    if rule.stacked:
        slot = tuple(spec.shape[1:])
        want = rule.hf_shape(slot)
        buf = np.empty(spec.shape, spec.dtype)
        for i in range(spec.shape[0]):
            buf[i] = rule.to_ours(reader.read(rule.key.format(i=i), want), slot)
    else:
        buf = rule.to_ours(reader.read(rule.key, rule.hf_shape(spec.shape)), spec.shape) \
            .astype(spec.dtype)
    out = jnp.asarray(buf)
    del buf
    return out


def export_leaf(rule: Rule, leaf) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, contiguous numpy tensor) of each HF tensor of one leaf."""
    host = np.asarray(jax.device_get(leaf))
    if rule.stacked:
        for i in range(host.shape[0]):
            yield rule.key.format(i=i), np.ascontiguousarray(rule.to_hf(host[i]))
    else:
        yield rule.key, np.ascontiguousarray(rule.to_hf(host))


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "INDEX_FILE", "read_config", "CheckpointReader",
           "write_checkpoint", "named_leaves", "Rule", "load_leaf", "export_leaf"]
