"""`jaxlm batch-infer`: a JSONL file of prompts in, a JSONL file of completions out.

Input lines: `{"id": ..., "prompt": "..."}` (ids unique; blank lines skipped).
Output lines: `{"id", "prompt", "completion", "tokens"}` in input order.

Sharding: weights are placed by the rules table on the mesh from the run's
config (or `mesh.*` overrides); each batch of `--batch-size` prompts (padded
up to a multiple of the batch's data shards, the padding rows dropped) is
split over the data axes by the model's `("batch", ...)` constraints.

Resumable: each output line is written whole, then flushed and fsynced. On
start the output file is read; a truncated last line (a crash mid-write) is
dropped by rewriting the file without it (atomically, via rename); the ids
already written are skipped.
"""

from __future__ import annotations

import json
import math
import os
import time

from jaxlm.errors import InputError


def read_inputs(path: str) -> list[dict]:
    """[{"id", "prompt"}] from a JSONL file; one-line InputError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise InputError(f"cannot read --input {path}: {e.strerror}") from None
    rows, seen = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "id" not in row:
            raise InputError(f"{path} line {n}: missing \"id\"")
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise InputError(f"{path} line {n}: \"prompt\" must be a non-empty string")
        key = _key(row["id"])
        if key in seen:
            raise InputError(f"{path} line {n}: duplicate id {row['id']!r} "
                             f"(first on line {seen[key]})")
        seen[key] = n
        rows.append({"id": row["id"], "prompt": row["prompt"]})
    return rows


def _key(id_) -> str:
    return json.dumps(id_, sort_keys=True)


def recover_output(path: str) -> set[str]:
    """Keys of the ids already in `path`; a truncated last line is dropped (the
    file rewritten atomically without it). A bad line before the last: InputError."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    done, keep = set(), []
    for n, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw)
            key = _key(row["id"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines) and not tail:
                tail = raw  # a last line that is complete but unparsable: torn write
                break
            raise InputError(f"--output {path} line {n} is corrupt; fix or remove it") from None
        done.add(key)
        keep.append(raw)
    if tail:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return done


def batch_infer(checkpoint: str, input_path: str, output_path: str, *, batch_size: int = 32,
                overrides=(), progress: bool = True) -> dict:
    import jax
    from tqdm.auto import tqdm

    import jaxlm
    from jaxlm.infer.generate import generate_kwargs
    from jaxlm.model import model_specs
    from jaxlm.model.config import config_from_dict, to_dict
    from jaxlm.model.params import logical_axes
    from jaxlm.scripts.generate import decode_ids
    from jaxlm.sharding.mesh import check_divisible, make_mesh
    from jaxlm.sharding.rules import partition_spec, tree_shardings, use_mesh
    from jaxlm.train.loop import read_run_config

    if batch_size < 1:
        raise InputError(f"--batch-size={batch_size} must be >= 1")
    rows = read_inputs(input_path)
    done = recover_output(output_path)
    todo = [r for r in rows if _key(r["id"]) not in done]
    saved = read_run_config(checkpoint)
    run = config_from_dict({"generate": to_dict(saved.generate), "mesh": to_dict(saved.mesh)},
                           list(overrides))
    g = run.generate
    cfg, params = jaxlm.load(checkpoint)
    if cfg.family == "encoder":
        raise InputError("encoders do not generate text; batch-infer needs a decoder or T5 model")
    tok = jaxlm.load_tokenizer(checkpoint)
    mesh = make_mesh(run.mesh)
    rules = run.mesh.rules
    check_divisible(mesh, rules, {"vocab": cfg.vocab_size, "heads": cfg.n_heads,
                                  "kv_heads": cfg.n_kv_heads, "mlp": cfg.d_ff,
                                  "embed": cfg.d_model,
                                  **({"experts": cfg.n_experts} if cfg.n_experts else {})})
    params = jax.device_put(params, tree_shardings(mesh, logical_axes(model_specs(cfg)), rules))
    spec = partition_spec(("batch",), rules)[0] or ()
    shards = math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))

    new_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), disable=not progress,
               desc="batch-infer", unit="prompt", dynamic_ncols=True)
    with open(output_path, "a", encoding="utf-8") as out, use_mesh(mesh, rules):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ids = [[tok.bos_id] + tok.encode(r["prompt"]) for r in chunk]
            n = len(ids)
            ids += [ids[0]] * (-n % shards)  # pad to the data shards; dropped below
            result = jaxlm.generate(params, cfg, ids, **generate_kwargs(g, tok.eos_id))
            # num_return_sequences > 1: the best (beams) or first (sampling) of each prompt
            for r, seq in zip(chunk, result.sequences()[::g.num_return_sequences][:n]):
                line = json.dumps({"id": r["id"], "prompt": r["prompt"],
                                   "completion": decode_ids(tok, seq, cfg.vocab_size),
                                   "tokens": seq}, ensure_ascii=False)
                out.write(line + "\n")  # whole, then on disk before the next
                out.flush()
                os.fsync(out.fileno())
                new_tokens += len(seq)
            bar.update(n)
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {"prompts": len(todo), "skipped": len(rows) - len(todo), "new_tokens": new_tokens,
               "seconds": round(seconds, 3),
               "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 else 0.0}
    return summary


def run_batch_infer(args):
    s = batch_infer(args.checkpoint, args.input, args.output, batch_size=args.batch_size,
                    overrides=args.overrides)
    print(f"batch-infer: {s['prompts']} prompts ({s['skipped']} already done), "
          f"{s['new_tokens']} new tokens in {s['seconds']:.1f}s: {s['tokens_per_s']:.1f} tokens/s; "
          f"wrote {args.output}")
    return s
