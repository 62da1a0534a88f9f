"""The base of a LoRA or DPO run, pinned: which weights its adapters (or its frozen
reference) belong to; and, alike, the frozen models a run reads again on resume: a
distillation run's teacher (teacher.json), a PPO run's reward model (reward_model.json).

A LoRA run's checkpoints hold the adapters only, and a full-weight DPO run rebuilds
its reference from the base on resume: both read `train.init_from` again later.
At the start of such a run, `base.json` in the run dir records

    {"path": absolute dir, "kind": "hf" | "jaxlm", "step": the jaxlm step read (or null),
     "digest": sha256 of the weight files' names and bytes, "name_or_path": config.json's,
     "files": {weight file: [size, mtime_ns, ctime_ns, inode]}}

and every later read (resume, `jaxlm.load`, generate, convert, quantize) checks the
digest of what it reads against it (without reading the bytes again while every
weight file keeps its recorded size, mtime, ctime and inode: a write changes ctime): replaced weights of the same shapes are one
line naming the path and both digests, not a different model with exit 0. A moved
base is pointed to with `train.init_from=NEW` (the digest must still match); an
explicit accept (`--accept-base-change`, `accept_base_change=True`) takes a
changed one, and a resume that accepts records the new digest.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import CheckpointError

FILE = "base.json"
TEACHER = "teacher.json"  # a distillation run's teacher (train.distill.teacher), pinned alike
REWARD_MODEL = "reward_model.json"  # a PPO run's reward model (train.ppo.reward_model_path)
_ROLES = {FILE: ("base", "train.init_from"), TEACHER: ("teacher", "train.distill.teacher"),
          REWARD_MODEL: ("reward model", "train.ppo.reward_model_path")}
_CHUNK = 1 << 23


def _weight_files(path: str, kind: str, step: int | None) -> list[str]:
    """The files whose bytes are the weights, relative to `path`, sorted."""
    if kind != "jaxlm":  # an HF dir (or a peft adapter dir)
        names = [n for n in os.listdir(path) if n.endswith((".safetensors", ".bin"))
                 or n.endswith(".safetensors.index.json")]
        return sorted(n for n in names if os.path.isfile(os.path.join(path, n)))
    from .checkpoint import CHECKPOINTS
    root = os.path.join(CHECKPOINTS, str(step))
    out = []
    for d, _, files in os.walk(os.path.join(path, root)):
        out += [os.path.relpath(os.path.join(d, f), path) for f in files]
    return sorted(out)


def _stats(path: str, files: list[str]) -> dict[str, list[int]]:
    """{file: [size, mtime_ns, ctime_ns, inode]}: any write to a file changes its ctime,
    which no tool can set back, so equal stats mean equal bytes."""
    out = {}
    for name in files:
        st = os.stat(os.path.join(path, name))
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _resolve_step(path: str, kind: str, step: int | None) -> int | None:
    from .checkpoint import latest_step
    if kind != "jaxlm":
        return None
    step = latest_step(path) if step is None else step
    if step is None or not os.path.isdir(os.path.join(path, "checkpoints", str(step))):
        raise CheckpointError(f"the base {path} has no checkpoint of step {step}")
    return step


def digest(path: str, step: int | None = None) -> tuple[str, int | None]:
    """(sha256 of the weights, the step read: a jaxlm dir's `step`, default its latest;
    None for an HF dir). Names and bytes of every weight file, read in 8 MiB chunks."""
    from ..api import checkpoint_kind
    kind = checkpoint_kind(path)
    step = _resolve_step(path, kind, step)
    h = hashlib.sha256()
    files = _weight_files(path, kind, step)
    if not files:
        raise CheckpointError(f"the base {path} has no weight files")
    for name in files:
        h.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16], step


def record(path: str) -> dict:
    """What base.json holds for the base dir `path` (read now)."""
    from ..api import checkpoint_kind
    path = os.path.abspath(path)
    kind = checkpoint_kind(path)
    d, step = digest(path)
    name = ""
    if kind == "hf":
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                name = str(json.load(f).get("_name_or_path") or "")
        except (OSError, ValueError):
            name = ""
    return {"path": path, "kind": kind, "step": step, "digest": d, "name_or_path": name,
            "files": _stats(path, _weight_files(path, kind, step))}


def read(run_dir: str, name: str = FILE) -> dict | None:
    """The run's base.json (or `name`: teacher.json), or None (a run without one, or
    from before it was kept)."""
    file = os.path.join(run_dir, name)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            rec = json.load(f)
        if not isinstance(rec, dict) or not isinstance(rec.get("digest"), str):
            raise ValueError("no digest")
        return rec
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt ({e})") from None


def write(run_dir: str, rec: dict, name: str = FILE) -> None:
    """base.json (or `name`), atomically."""
    file = os.path.join(run_dir, name)
    with open(file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    os.replace(file + ".tmp", file)


def resolve(run_dir: str, init_from: str, given: str | None = None,
            accept: bool = False, name: str = FILE) -> tuple[str, int | None, dict | None]:
    """(the base dir to read, its step, the record to keep) for the run in `run_dir`
    whose config names `init_from`; `given`: a dir pointed to instead (a moved base).
    name=TEACHER / REWARD_MODEL: the same for a distillation run's teacher
    (train.distill.teacher) / a PPO run's reward model (train.ppo.reward_model_path).

    The record is base.json's (None for a run without one), updated to the dir read;
    its digest is checked: a change is a CheckpointError naming the path and both
    digests unless `accept`, and then the record takes the new digest."""
    role, key = _ROLES[name]
    path = os.path.abspath(given or init_from)
    if not init_from and not given:
        raise CheckpointError(f"{run_dir} needs its {role} ({key}), and names none")
    if not os.path.isdir(path):
        raise CheckpointError(f"the {role} of {run_dir}, {path}, is not a directory: point to "
                              f"where it is now with {key}=DIR")
    rec = read(run_dir, name)
    if rec is None:
        return path, None, None
    if path == rec.get("path") and rec.get("files") and _unchanged(path, rec):
        return path, rec.get("step"), rec  # the files recorded, untouched: no re-read
    try:
        now, step = digest(path, rec.get("step"))
    except CheckpointError:
        if accept:
            now, step = digest(path)
        else:
            raise
    if now != rec["digest"]:
        if not accept:
            raise CheckpointError(
                f"the {role} of {run_dir} changed: {path} has weights digest {now}, the run was "
                f"trained on {rec['digest']} ({rec.get('path')}, recorded in {name}); point "
                f"{key}=DIR at the original, or accept this {role} with "
                "--accept-base-change (accept_base_change=True in Python)")
    from ..api import checkpoint_kind
    kind = checkpoint_kind(path)
    return path, step, {**rec, "path": path, "kind": kind, "step": step, "digest": now,
                        "files": _stats(path, _weight_files(path, kind, step))}


def _unchanged(path: str, rec: dict) -> bool:
    """Whether the weight files are the recorded ones, by their stats."""
    from ..api import checkpoint_kind
    try:
        kind = checkpoint_kind(path)
        files = _weight_files(path, kind, _resolve_step(path, kind, rec.get("step")))
        return _stats(path, files) == rec["files"]
    except (OSError, CheckpointError):
        return False
