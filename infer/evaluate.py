"""Evaluation of a model in memory: perplexity over files and lm-eval tasks, one dict of
numbers (what `jaxlm eval` writes and a training run logs at eval_every).

    docs = read_eval_data(["valid.txt", "more.jsonl", "prepared/"], tok)
    result = evaluate(params, cfg, tok, docs=docs, tasks=["hellaswag"], mesh=mesh, rules=rules)
    result["perplexity"]["bits_per_byte"], result["tasks"]["hellaswag"]["acc,none"]

Files: a text file is one document; a `.jsonl` file one document per line (its
"text"); a directory prepared by `jaxlm prepare` one document per record (its token
ids as stored: BOS first, EOS last; bytes counted on their decoded text). Tasks:
lm-eval task names (lm-eval's own, or YAMLs in `task_path`), run through jaxlm's
lm-eval backend (`jaxlm.infer.harness`).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import NamedTuple, Optional, Sequence

from ..errors import CheckpointError, ConfigError, InputError


class EvalDocs(NamedTuple):
    """Documents to score: token ids (the prefix token first, not scored) and bytes."""
    ids: list  # per document: [prefix] + ids
    bytes: int  # UTF-8 bytes of their text
    files: list  # the paths read


def read_eval_data(paths: Sequence[str], tokenizer) -> EvalDocs:
    """Documents of text / .jsonl files and prepared corpora (see the module docstring);
    an InputError names a missing or empty one."""
    from ..train.prepare import file_texts
    from .score import prefix_id
    if not paths:
        raise InputError("no --data files given")
    docs, n_bytes = [], 0
    for p in paths:
        path = pathlib.Path(p).expanduser()
        if path.is_dir():
            got, b = _prepared_docs(path, tokenizer)
        elif path.is_file():
            texts = list(file_texts(path))
            got = [[prefix_id(tokenizer)] + ids
                   for ids in tokenizer.encode_batch(texts, split_special_tokens=True)]
            got = [d for d in got if len(d) > 1]
            b = sum(len(t.encode("utf-8")) for t in texts)
        else:
            raise InputError(f"--data {p}: no such file or directory")
        if not got:
            raise InputError(f"--data {p}: empty (no text to score)")
        docs += got
        n_bytes += b
    return EvalDocs(docs, n_bytes, [str(p) for p in paths])


def _prepared_docs(path: pathlib.Path, tokenizer):
    import grain
    import numpy as np

    from ..train.prepare import read_manifest, tokenizer_digest
    if not (path / "manifest.json").is_file():
        raise InputError(f"--data {path}: a directory must be a corpus prepared by `jaxlm "
                         "prepare` (no manifest.json)")
    manifest = read_manifest(path)
    if manifest.get("tokenizer_digest") != tokenizer_digest(tokenizer):
        raise InputError(f"--data {path} was prepared with another tokenizer than the "
                         "checkpoint's: prepare it again with the checkpoint's tokenizer")
    shards = [str(path / s["file"]) for e in manifest["inputs"] for s in e["shards"]
              if s["records"]]
    if not shards:
        return [], 0
    source = grain.sources.ArrayRecordDataSource(shards)
    docs, n_bytes = [], 0
    for i in range(len(source)):
        ids = np.frombuffer(source[i], dtype="<i4").astype(int).tolist()
        if len(ids) > 1:
            docs.append(ids)
            inner = [t for t in ids if t not in (tokenizer.bos_id, tokenizer.eos_id)]
            n_bytes += len(tokenizer.decode(inner).encode("utf-8"))
    return docs, n_bytes


def task_manager(task_path: str | None = None, names: Sequence[str] = ()):
    """lm-eval's TaskManager: only `task_path`'s YAMLs when every name is found there
    (indexing lm-eval's own thousands of task files takes a while), else with them."""
    _need_lm_eval()
    from lm_eval.tasks import TaskManager
    if task_path:
        if not os.path.isdir(task_path):
            raise InputError(f"--include-path {task_path}: not a directory of task YAMLs")
        local = TaskManager(include_path=task_path, include_defaults=False)
        if names and all(_known(local, n) for n in names):
            return local
    return TaskManager(include_path=task_path or None)


def _need_lm_eval() -> None:
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("tasks run through lm-evaluation-harness, which is not installed: "
                          "pip install 'jaxlm[eval]'")


def _known(manager, name: str) -> bool:
    return bool(manager.match_tasks([name]))


def check_tasks(manager, names: Sequence[str]) -> None:
    """A one-line ConfigError naming the task names lm-eval does not know."""
    import difflib
    unknown = [n for n in names if not _known(manager, n)]
    if unknown:
        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"unknown task {unknown[0]!r}{hint}: see `lm_eval ls tasks`, or "
                          "give a directory of task YAMLs with --include-path")


def evaluate(params, cfg, tokenizer, *, docs: Optional[EvalDocs] = None, tasks=(),
             task_path: str | None = None, manager=None, max_length: Optional[int] = None,
             stride: Optional[int] = None, batch_size: int = 16, num_fewshot=None,
             limit=None, mesh=None, rules=None, chat_template_dir: str | None = None,
             progress: bool = False) -> dict:
    """{"perplexity": {...}, "tasks": {task: {metric: value}}, "truncated": n} of the
    docs and tasks given (see the module docstring)."""
    from .score import perplexity
    out: dict = {}
    if docs is not None:
        ppl = perplexity(params, cfg, docs.ids, max_length=max_length, stride=stride,
                         batch_size=batch_size, mesh=mesh, rules=rules, progress=progress)
        bits = ppl.nll * ppl.tokens / math.log(2)
        out["perplexity"] = {
            "files": docs.files, "documents": len(docs.ids), "tokens": ppl.tokens,
            "bytes": docs.bytes, "nll": ppl.nll, "perplexity": ppl.perplexity,
            "bits_per_token": ppl.nll / math.log(2),
            "bits_per_byte": bits / docs.bytes if docs.bytes else None,
            "max_length": max_length or cfg.max_seq_len, "stride": stride or max_length
            or cfg.max_seq_len}
    if tasks:
        out.update(run_tasks(params, cfg, tokenizer, tasks, task_path=task_path,
                             manager=manager, batch_size=batch_size, num_fewshot=num_fewshot,
                             limit=limit, max_length=max_length, mesh=mesh, rules=rules,
                             chat_template_dir=chat_template_dir, progress=progress))
    return out


def run_tasks(params, cfg, tokenizer, tasks, *, task_path=None, manager=None,
              batch_size: int = 16, num_fewshot=None, limit=None, max_length=None,
              mesh=None, rules=None, chat_template_dir=None, progress=False) -> dict:
    """lm-eval's simple_evaluate of `tasks` on jaxlm's backend: {"tasks": {task:
    {metric: value}}, "truncated": requests cut from the left}."""
    _need_lm_eval()
    from lm_eval import simple_evaluate

    from .harness import JaxlmLM, register
    register()
    manager = manager or task_manager(task_path, tasks)
    check_tasks(manager, tasks)
    lm = JaxlmLM(params=params, cfg=cfg, tokenizer=tokenizer, batch_size=batch_size,
                 max_length=max_length, mesh=mesh, rules=rules,
                 chat_template_dir=chat_template_dir, progress=progress)
    got = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                          num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0,
                          log_samples=False)
    results = {name: {k: v for k, v in metrics.items() if k != "sample_len"
                      and isinstance(v, (int, float)) and not isinstance(v, bool)}
               for name, metrics in got["results"].items()}
    return {"tasks": results, "truncated": lm.truncated}


def tokenizer_for(directory):
    """The checkpoint's tokenizer; a one-line CheckpointError where it has none."""
    from ..model.tokenizer import load_tokenizer
    try:
        return load_tokenizer(directory)
    except InputError:
        raise CheckpointError(f"{directory} has no tokenizer (tokenizer.json or "
                              "tokenizer.model): evaluation reads text") from None
