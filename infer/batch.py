"""`jaxlm batch-infer`: a JSONL file of prompts in, a JSONL file of completions out.

Input lines: `{"id": ..., "prompt": "...", KEY: VALUE, ...}` or, in place of the prompt,
`"messages": [{"role": ..., "content": ...}, ...]` (a conversation, rendered with the
checkpoint's chat template and its generation prompt); ids unique, blank lines
skipped. A line may set its own decoding settings (`ROW_KEYS`): max_new_tokens,
temperature, top_k, top_p, min_p, seed, repetition_penalty, presence_penalty,
frequency_penalty, no_repeat_ngram_size, min_new_tokens, stop_ids, length_penalty,
early_stopping, `n` (samples: generate.num_return_sequences), `stop` (a string or a
list of strings: the completion ends before the first one its text holds) and one of
`json_schema` / `regex` / `choice` (guided decoding); the rest come from the
generate.* settings. Any other key is a one-line error naming it.
Output lines, in input order: `{"id", "prompt" (or "messages"), "completion", "tokens",
"finish_reason"}` ("stop": a stop id or string, "length": max_new_tokens); with
n > 1 (or num_return_sequences beams) "completions", "tokens" and "finish_reasons"
hold one entry per sequence.

All rows run through the one engine (`jaxlm.infer.engine`): continuous batching
over a paged pool (`--engine auto` / `continuous`) of --batch-size slots, or over a
contiguous cache (`static`), in chunks of prompts (8 x batch-size; `static`:
batch-size) whose lines are written as their chunk completes.

Checkpoints: a jaxlm run dir (its saved generate/mesh settings are the base of
the overrides) or a Hugging Face dir (tokenizer.json preferred; the stop ids are
the tokenizer's EOS, every `eos_token_id` of generation_config.json, then
generate.stop_ids; its decoding defaults (do_sample, temperature, top_k, ...)
fill the generate.* keys the command line does not give: `jaxlm.infer.text`).
Decoders get BOS (if the tokenizer has one) + the prompt, encoder-decoders the
prompt + EOS; `chat=True` renders it as one user message with the checkpoint's
chat template instead.

Multi-host (after `jaxlm.sharding.distributed.initialize`): every process reads
the input and runs every batch on the one global mesh (`generate` gathers the
outputs); process 0 alone recovers, checks and appends to the output file and
shares what is left to do, so the file is the one-process run's and a killed
run (either process) resumes like one.

Sharding: weights are placed by the rules table on the mesh from the run's
config (or `mesh.*` overrides); each batch of `--batch-size` prompts (padded
up to a multiple of the batch's data shards, the padding rows dropped) is
split over the data axes by the model's `("batch", ...)` constraints.

Resumable: each output line is written whole, then flushed and fsynced. On
start the output file is read; a truncated last line (a crash mid-write) is
dropped by rewriting the file without it (atomically, via rename); the ids
already written are skipped.

Exactly what was asked: each output line also records what produced it,
`prompt_hash` (of the prompt) and `settings_hash` (of the checkpoint path and
step and the generate settings). A rerun where a done line's prompt or the
settings changed is refused with one line (`on_change="refuse"`, the
default), or those lines are dropped and generated again ("regenerate").

Seed-stable: row r samples with fold_in(key(generate.seed), row_seed(id)), a
31-bit hash of the input's id, and every batch uses one cache length (from the
longest prompt of the whole input), so a line's completion does not depend on
the batch size, the order of the input, or whether the job was resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time

from ..errors import InputError


def read_inputs(path: str) -> list[dict]:
    """[{"id", "prompt"}] from a JSONL file; one-line InputError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise InputError(f"cannot read --input {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--input {path} is not UTF-8 text (byte {e.start})") from None
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
        if ("prompt" in row) == ("messages" in row):
            raise InputError(f"{path} line {n}: give \"prompt\" (a string) or \"messages\" "
                             "(a conversation), one of them")
        if "messages" in row:
            from ..model.chat import check_messages
            check_messages(row["messages"], f"{path} line {n}", need_assistant=False)
        elif not isinstance(row["prompt"], str) or not row["prompt"]:
            raise InputError(f"{path} line {n}: \"prompt\" must be a non-empty string")
        key = _key(row["id"])
        if key in seen:
            raise InputError(f"{path} line {n}: duplicate id {row['id']!r} "
                             f"(first on line {seen[key]})")
        seen[key] = n
        extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages")}
        for k in extra:
            if k not in ROW_KEYS:
                import difflib
                hint = difflib.get_close_matches(k, list(ROW_KEYS) + ["id", "prompt", "messages"],
                                                 n=1)
                raise InputError(f"{path} line {n}: unknown key {k!r}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                 + f"; a line holds id, prompt or messages, and "
                                 f"{', '.join(ROW_KEYS)}")
        rows.append({"id": row["id"], "line": n, "settings": extra,
                     **{k: row[k] for k in ("prompt", "messages") if k in row}})
    return rows


# the keys an input line may set besides id and prompt: generate.* settings (n is
# num_return_sequences), stop strings, and a guide
ROW_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
            "repetition_penalty", "presence_penalty", "frequency_penalty",
            "no_repeat_ngram_size", "min_new_tokens", "stop_ids", "length_penalty",
            "early_stopping", "n", "stop", "json_schema", "regex", "choice")
GUIDE_KEYS = ("json_schema", "regex", "choice")


def row_settings(g, row: dict, path: str):
    """(GenerateConfig, guide spec or None) of an input row: g with the row's own keys
    (its stop strings too), or a one-line InputError naming the line."""
    import dataclasses
    from ..errors import ConfigError
    extra = dict(row["settings"])
    where = f"{path} line {row['line']}"
    stop = extra.get("stop", [])
    if not isinstance(stop, (str, list)) or not all(isinstance(s, str) and s for s in
                                                     ([stop] if isinstance(stop, str) else stop)):
        raise InputError(f"{where}: \"stop\" must be a string or a list of non-empty "
                         f"strings, got {stop!r}")
    guides = [k for k in GUIDE_KEYS if k in extra]
    if len(guides) > 1:
        raise InputError(f"{where}: give one of {', '.join(GUIDE_KEYS)}, not {guides}")
    guide = (guides[0], extra.pop(guides[0])) if guides else None
    if "n" in extra:
        extra["num_return_sequences"] = extra.pop("n")
        if g.num_beams > 1:
            raise InputError(f"{where}: \"n\" samples with generate.num_beams={g.num_beams}: "
                             "beam search returns num_return_sequences hypotheses instead")
    for k, v in extra.items():
        if k == "early_stopping" or k == "stop_ids":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"{where}: {k}={v!r} must be a number")
    try:
        return dataclasses.replace(g, **extra), guide
    except ConfigError as e:
        raise InputError(f"{where}: {e}") from None
    except TypeError as e:
        raise InputError(f"{where}: {e}") from None


def _key(id_) -> str:
    return json.dumps(id_, sort_keys=True)


def row_seed(id_) -> int:
    """A stable 31-bit seed from an input id (the same in every process and run)."""
    digest = hashlib.sha256(_key(id_).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _hash(obj) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_paths(input_path: str, output_path: str) -> None:
    """--output must be a writable file path, not --input itself."""
    if os.path.abspath(output_path) == os.path.abspath(input_path) or (
            os.path.exists(output_path) and os.path.exists(input_path)
            and os.path.samefile(output_path, input_path)):
        raise InputError(f"--output {output_path} is the --input file: choose another path")
    if os.path.isdir(output_path):
        raise InputError(f"--output {output_path} is a directory: give a file path")
    parent = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(parent):
        raise InputError(f"--output {output_path}: its directory {parent} does not exist")


def recover_output(path: str) -> set[str]:
    """Keys of the ids already in `path`; a truncated last line is dropped (the
    file rewritten atomically without it). A bad line before the last: InputError."""
    return set(recover_rows(path))


def recover_rows(path: str) -> dict[str, dict]:
    """{id key: output row} of `path`, after dropping a truncated last line (see
    `recover_output`)."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    done, keep = {}, []
    for n, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw)
            key = _key(row["id"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines) and not tail:
                tail = raw  # a last line that is complete but unparsable: torn write
                break
            raise InputError(f"--output {path} line {n} is corrupt; fix or remove it") from None
        done[key] = row
        keep.append(raw)
    if tail:
        _rewrite(path, keep)
    return done


def _rewrite(path: str, lines: list[bytes]) -> None:
    from ..train.guard import rewrite_lines  # atomic: a crash leaves the old file whole
    rewrite_lines(path, lines)


def _changed(rows, done: dict, settings: str) -> list[tuple[dict, str]]:
    """(input row, what changed) for each done line produced from another prompt or
    other settings."""
    out = []
    for r in rows:
        old = done.get(_key(r["id"]))
        if old is None:
            continue
        if old.get("prompt_hash") != _prompt_hash(r):
            out.append((r, "its prompt changed"))
        elif old.get("settings_hash") != _row_hash(settings, r):
            out.append((r, "the checkpoint or generate settings changed"))
    return out


def _prompt_hash(row: dict) -> str:
    return _hash(row["prompt"] if "prompt" in row else {"messages": row["messages"]})


def _row_hash(settings: str, row: dict) -> str:
    """The settings hash of a row's output line: the job's, and the row's own keys."""
    return settings if not row["settings"] else _hash({"job": settings, "row": row["settings"]})


def _drop_lines(path: str, keys: set[str]) -> None:
    with open(path, "rb") as f:
        lines = [raw for raw in f.read().split(b"\n") if raw]
    _rewrite(path, [raw for raw in lines if _key(json.loads(raw)["id"]) not in keys])


def _run_settings(checkpoint: str, overrides):
    """(run config with generate + mesh, model.* overrides, whether `checkpoint` is an
    HF dir). A jaxlm run dir's saved generate/mesh settings are the base; an HF dir
    has none (its generation_config.json gives the stop ids, see `stop_ids`)."""
    from ..api import checkpoint_kind
    from ..config import config_from_dict, to_dict
    from .text import split_model_overrides
    from ..train.loop import read_run_config
    hf_dir = checkpoint_kind(checkpoint) != "jaxlm"  # an HF or a peft dir: no saved settings
    model_overrides, overrides = split_model_overrides(list(overrides))
    saved = {} if hf_dir else read_run_config(checkpoint)
    base = {} if hf_dir else {"generate": to_dict(saved.generate), "mesh": to_dict(saved.mesh)}
    return config_from_dict(base, overrides), model_overrides, hf_dir


def _plan_output(rows, input_path: str, output_path: str, settings: str, on_change: str):
    """Process 0's look at --output: (indices of the rows still to do, how many were
    dropped to regenerate). Drops a torn last line; refuses (InputError) or drops
    the done lines whose prompt or settings changed."""
    check_paths(input_path, output_path)
    done = recover_rows(output_path)
    changed = _changed(rows, done, settings)
    if changed and on_change == "refuse":
        r, what = changed[0]
        raise InputError(f"--output {output_path} holds {len(changed)} line(s) made from other "
                         f"input: id {r['id']!r} ({input_path} line {r['line']}): {what}; "
                         "pass --on-change regenerate to redo them, or choose a new --output")
    if changed:
        redo = {_key(r["id"]) for r, _ in changed}
        _drop_lines(output_path, redo)
        done = {k: v for k, v in done.items() if k not in redo}
    return [i for i, r in enumerate(rows) if _key(r["id"]) not in done], len(changed)


def _shared_plan(*args):
    """`_plan_output` run by process 0 only (the one process that touches --output),
    its result (or its InputError) shared with every process, so that all of them
    run the same batches."""
    import jax

    from ..sharding.distributed import share_from_zero
    plan, error = None, None
    if jax.process_index() == 0:
        try:
            plan = _plan_output(*args)
        except InputError as e:
            error = e
    shared = share_from_zero({"plan": plan, "error": None if error is None else str(error)})
    if error is not None:
        raise error
    if shared["error"] is not None:
        raise InputError(shared["error"])
    return shared["plan"]


ENGINES = ("auto", "continuous", "static")
CONTINUOUS_CHUNK = 8  # a chunk is 8 x batch_size prompts over batch_size slots (static: 1 x)


def generate_rows(engine, chunk: list, prepared: dict) -> list:
    """One chunk of input rows through the engine: each row's request queued (its
    settings, stop strings, guide, and row_seed(id) as its seed's fold), the engine
    stepped until all of them finished -> their Requests, in the chunk's order."""
    reqs = []
    for r in chunk:
        ids, g, guide, eos = prepared[_key(r["id"])]
        reqs.append(engine.add(ids, g, guide=guide, row_seed=row_seed(r["id"]), eos_ids=eos))
    while not all(q.finished for q in reqs):
        engine.step()
    return reqs


def _line(r: dict, req, settings: str) -> str:
    outs = req.outputs
    row = {"id": r["id"], **{k: r[k] for k in ("prompt", "messages") if k in r}}
    if len(outs) == 1:
        o = outs[0]
        row.update(completion=o.text, tokens=_ids(o), finish_reason=o.finish_reason)
    else:
        row.update(completions=[o.text for o in outs], tokens=[_ids(o) for o in outs],
                   finish_reasons=[o.finish_reason for o in outs])
    row.update(prompt_hash=_prompt_hash(r), settings_hash=_row_hash(settings, r))
    return json.dumps(row, ensure_ascii=False)


def _ids(o) -> list:
    """An output's ids as the completion's text has them (the final stop id left out)."""
    return o.tokens[:-1] if o.stopped_by_id else list(o.tokens)


def _guide_of(spec, tok, vocab_size: int, cache: dict, where: str):
    """A row's guide ("json_schema" / "regex" / "choice", value), compiled once per spec."""
    if spec is None:
        return None
    from .guided import Guide
    kind, value = spec
    key = json.dumps(spec, sort_keys=True)
    if key not in cache:
        try:
            cache[key] = (Guide.json_schema(value, tok, vocab_size) if kind == "json_schema"
                          else Guide.regex(value, tok, vocab_size) if kind == "regex"
                          else Guide.choice(value, tok, vocab_size))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    return cache[key]


def batch_infer(checkpoint: str, input_path: str, output_path: str, *, batch_size: int = 32,
                overrides=(), progress: bool = True, on_change: str = "refuse",
                step: int | None = None, chat: bool = False, engine: str = "auto",
                guide=None, init_from: str | None = None,
                accept_base_change: bool = False) -> dict:
    """Generate a completion for every input row not yet in --output (see the module
    docstring). checkpoint: a jaxlm run dir, a Hugging Face dir or a peft adapter dir
    (init_from / accept_base_change: a LoRA run's moved or changed base, `jaxlm.load`). Multi-host
    (after `jaxlm.sharding.distributed.initialize`): every process reads the input
    and runs every chunk on the global mesh; process 0 alone reads and writes
    --output (the others hold no file), so the file is the one-process file.
    guide: ("json_schema" | "regex" | "choice", value) for the rows that give none.
    The summary's "engine" holds the engine's own counters (requests admitted,
    prefill calls, the prompt pages allocated)."""
    import jax
    from tqdm.auto import tqdm

    from ..api import companions_dir, load, model_config_of
    from ..config import to_dict
    from ..model.tokenizer import load_tokenizer
    from ..errors import CheckpointError
    from .text import apply_model_overrides, chat_ids, chat_template_for, stop_ids
    from ..sharding.mesh import check_divisible, make_mesh
    from ..sharding.rules import partition_spec, use_mesh
    from ..train.checkpoint import latest_step
    from .engine import Engine, Features
    from .text import (decode_ids, encode_prompts, generation_settings, given_generate_keys,
                       resolve_generate)

    if batch_size < 1:
        raise InputError(f"--batch-size={batch_size} must be >= 1")
    if engine not in ENGINES:
        raise InputError(f"--engine={engine!r} must be one of {', '.join(ENGINES)}")
    if on_change not in ("refuse", "regenerate"):
        raise InputError(f"--on-change={on_change!r} must be 'refuse' or 'regenerate'")
    rows = read_inputs(input_path)
    run, model_overrides, hf_dir = _run_settings(checkpoint, overrides)
    g = run.generate
    if hf_dir and step is not None:
        raise InputError(f"--step {step}: {checkpoint} is a Hugging Face or peft dir, it has no "
                         "steps")
    step = None if hf_dir else (latest_step(checkpoint) if step is None else step)
    cfg = apply_model_overrides(model_config_of(checkpoint, init_from), model_overrides)
    files = companions_dir(checkpoint, init_from)  # tokenizer, template, generation config
    if cfg.family == "encoder":
        raise InputError(f"{checkpoint} is an encoder-only model ({cfg.family}): batch-infer "
                         "needs a generative model (a decoder or an encoder-decoder like T5)")
    tok = load_tokenizer(files)
    template = chat_template_for(files) if chat else None
    if template is None and any("messages" in r for r in rows):
        first = next(r for r in rows if "messages" in r)
        try:
            template = chat_template_for(files)
        except CheckpointError:
            raise InputError(f"{input_path} line {first['line']}: \"messages\" are rendered "
                             f"with the checkpoint's chat template, and {checkpoint} has none"
                             ) from None
    texts = iter(encode_prompts(tok, cfg, [r["prompt"] for r in rows if "prompt" in r],
                                chat_template=template))
    encoded = {_key(r["id"]): chat_ids(tok, template, r["messages"]) if "messages" in r
               else next(texts) for r in rows}
    gen = generation_settings(files, tok)
    # generation_config.json's decoding defaults for the keys not given (a run's saved
    # generate section: those it sets to other than the defaults)
    g = resolve_generate(g, gen, given_generate_keys(
        overrides, saved=None if hf_dir else to_dict(g)))
    stops = tuple(stop_ids(gen.eos_ids, g, cfg.vocab_size))
    settings = _hash({"checkpoint": os.path.realpath(checkpoint), "step": step,
                      "generate": {k: v for k, v in to_dict(g).items()
                                   if k != "prefix_cache"},  # the outputs' own settings
                      "model": sorted(model_overrides),
                      **({"chat": True} if chat else {}),
                      **({"stop": list(stops)} if hf_dir else {}),
                      **({"guide": list(guide)} if guide is not None else {})})
    guides: dict = {}
    prepared = {}
    for r in rows:  # every row's settings, checked before anything runs
        rg, spec = row_settings(g, r, input_path)
        where = f"{input_path} line {r['line']} (id {r['id']!r})"
        ids = encoded[_key(r["id"])]
        if cfg.family == "decoder" and len(ids) + rg.max_new_tokens > cfg.max_seq_len:
            raise InputError(f"{where}: the prompt has {len(ids)} tokens + "
                             f"generate.max_new_tokens={rg.max_new_tokens}, more than "
                             f"model.max_seq_len={cfg.max_seq_len}")
        row_guide = _guide_of(spec if spec is not None else guide, tok, cfg.vocab_size, guides,
                              where)
        if row_guide is not None and not stops:
            raise InputError(f"{where}: guided decoding needs a stop id (the tokenizer has "
                             "no EOS; give generate.stop_ids)")
        eos = tuple(dict.fromkeys(stops + tuple(rg.stop_ids)))
        prepared[_key(r["id"])] = (ids, rg, row_guide, eos)
    todo_idx, n_changed = _shared_plan(rows, input_path, output_path, settings, on_change)
    todo = [rows[i] for i in todo_idx]

    mesh, rules = make_mesh(run.mesh), run.mesh.rules
    check_divisible(mesh, rules, {"vocab": cfg.vocab_size, "heads": cfg.n_heads,
                                  "kv_heads": cfg.n_kv_heads, "mlp": cfg.d_ff,
                                  "embed": cfg.d_model,
                                  **({"experts": cfg.moe.n_experts} if cfg.moe.n_experts else {})})
    _, params = load(checkpoint, cfg=cfg, mesh=mesh, rules=rules, step=step, init_from=init_from,
                     accept_base_change=accept_base_change)
    spec = partition_spec(("batch",), rules)[0] or ()
    shards = math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))
    writer = jax.process_index() == 0
    # one engine for the whole job: its buffers and compiled features cover every row
    every = [prepared[_key(r["id"])] for r in rows]
    feats = Features.of([x[1] for x in every], cfg.vocab_size,
                        guided=any(x[2] is not None for x in every),
                        beams=g.num_beams if g.num_beams > 1 else 0,
                        stops=max(4, 1 << (max(len(x[3]) for x in every) - 1).bit_length()))
    width = max((x[1].num_beams if x[1].num_beams > 1 else x[1].num_return_sequences)
                for x in every)
    slots = -(-max(batch_size, width) // (shards * width)) * shards * width
    decoder_start = gen.decoder_start_id if cfg.family == "encoder_decoder" and \
        gen.decoder_start_id is not None else 0

    new_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), disable=not (progress and writer),
               desc="batch-infer", unit="prompt", dynamic_ncols=True)
    with (open(output_path, "a", encoding="utf-8") if writer else contextlib.nullcontext()) \
            as out, use_mesh(mesh, rules):
        eng = Engine(params, cfg, settings=g, max_prompt_len=max(len(x[0]) for x in every),
                     max_new_tokens=max(x[1].max_new_tokens for x in every), slots=slots,
                     cache="contiguous" if engine == "static" else "paged", features=feats,
                     detokenize=lambda ids: decode_ids(tok, ids, cfg.vocab_size),
                     decoder_start_id=decoder_start,
                     guides=list({id(x[2]): x[2] for x in every if x[2] is not None}.values()))
        chunk_size = batch_size * (1 if engine == "static" else CONTINUOUS_CHUNK)
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            for r, req in zip(chunk, generate_rows(eng, chunk, prepared)):
                new_tokens += sum(len(o.tokens) for o in req.outputs)
                if writer:
                    out.write(_line(r, req, settings) + "\n")  # whole, then on disk
                    out.flush()
                    os.fsync(out.fileno())
            bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - t0
    return {"prompts": len(todo), "skipped": len(rows) - len(todo),
            "regenerated": n_changed, "new_tokens": new_tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 else 0.0,
            "engine": dict(eng.stats, cache=eng.kind, slots=eng.n_slots)}
