"""GRPO's (and PPO's) data: prompts in, scored rollouts out, each step, by the one engine.

    rollouts = Rollouts(cfg, tokenizer, template, load_prompt_records("prompts.jsonl"))
    host_batch, metrics = rollouts.batch(state, step)   # the GRPO batch of train/grpo.py

Prompts are JSONL: {"prompt": str} ([bos] + its ids) or {"prompt": [messages]}
(rendered with the chat template and the generation prompt); every other field
goes to the reward functions, one list per field. Each rollout step takes the next
data.batch_size / G prompts (shuffled with data.seed each epoch) and samples G
completions of each with `infer.engine.Engine` over the training params themselves
(the LoRA adapters merged into the base once per rollout): the same arrays, the
same shardings, no copy; the G samples of a prompt share its prefilled pages. The
sampling keys come from (train.seed, step), so a resumed run draws what an
uninterrupted one does. The rollout's per-token log-probs are kept as the
importance ratio's old log-probs (at temperature 1 the engine's own, under the
raw logits; otherwise one forward of the rollout policy at logits / temperature,
as TRL's log-probs are).

Rewards (train.grpo.reward_funcs, weighted by reward_weights) give each completion
a float; advantages are normalised within each prompt's group as TRL's
`_generate_and_score_completions` does (sum_then_normalize). With
train.grpo.num_iterations = mu > 1 a rollout serves mu optimizer steps; the batch
in use travels in the data state, so a resume mid-way continues it exactly.

PPO (train/ppo.py) samples with this same machinery (`sample`: one completion per
prompt, train.ppo's length and temperature) and scores the rollout its own way.
"""

from __future__ import annotations

import ast
import base64
import importlib
import io
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from ..errors import ConfigError, InputError
from ..model.chat import check_messages
from ..model.tokenizer import Tokenizer
from .grpo import token_logps
from .sft import STDLIB_SFT, _jsonl_records, stdlib_sft_limits, stdlib_sft_records

ROLLOUT_STREAM = 0x67727030  # "grp0": the rollouts' own stream of train.seed


# ---------------------------------------------------------------- prompts


def load_prompt_records(source: str | Sequence[str], *, max_records: int | None = None,
                        seq_len: int | None = None) -> list[dict]:
    """Checked {"prompt": str | [messages], ...} records of `.jsonl` files; or
    "stdlib-sft": the standard library's documented functions, prompt = the `def`
    through its docstring, "completion" = the body it has (a field for the rewards)."""
    if source == STDLIB_SFT:
        return stdlib_sft_records(max_records=max_records or 20_000, **stdlib_sft_limits(seq_len))
    records = list(_jsonl_records(source, max_records))
    for r in records:
        where = r.get("where", "record")
        if "prompt" not in r:
            raise InputError(f"{where}: a GRPO record needs \"prompt\" (a string or messages)")
        if not isinstance(r["prompt"], str):
            check_messages(r["prompt"], f"{where}: prompt", need_assistant=False)
    if not records:
        raise InputError(f"no prompts in {source!r}")
    return records


def encode_prompt(record: Mapping[str, Any], tokenizer: Tokenizer, template: str | None):
    """Model input ids of a record's prompt."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(prompt)
    from ..infer.text import chat_ids
    from ..model.chat import resolve_chat_template
    return chat_ids(tokenizer, template or resolve_chat_template(""), prompt)


# ---------------------------------------------------------------- rewards


def _exact(field: str):
    def exact(prompts, completions, **fields):
        if field not in fields:
            raise InputError(f"reward exact:{field}: the records have no field {field!r}")
        return [float(c.strip() == str(ref).strip()) for c, ref in zip(completions, fields[field])]
    exact.__name__ = f"exact:{field}"
    return exact


def python_parses(prompts, completions, **fields):
    """1.0 where the prompt's text followed by the completion parses as Python
    (`ast.parse`) and the completion adds at least one statement (a comment or blank
    lines add none), else 0.0: a verifiable reward for code prompts such as
    stdlib-sft's (a function's `def` and docstring, to be completed by a body that
    ends). For a chat prompt, the completion alone is parsed."""
    out = []
    for p, c in zip(prompts, completions):
        head = p if isinstance(p, str) else ""
        try:
            whole = _statements(head + c)
        except (SyntaxError, ValueError):  # ValueError: a NUL byte
            out.append(0.0)
            continue
        try:
            before = _statements(head)
        except (SyntaxError, ValueError):  # a prompt that is no program alone
            before = 0
        out.append(float(whole > before))
    return out


def _statements(source: str) -> int:
    return sum(isinstance(n, ast.stmt) for n in ast.walk(ast.parse(source)))


python_parses.__name__ = "python"


def _regex(pattern: str):
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"train.grpo.reward_funcs: regex:{pattern} is not a valid regular "
                          f"expression ({e})") from None

    def regex(prompts, completions, **fields):
        return [float(compiled.search(c) is not None) for c in completions]
    regex.__name__ = f"regex:{pattern}"
    return regex


class ClassifierReward:
    """A reward model as a reward function: a sequence classifier dir (jaxlm or an HF
    `*ForSequenceClassification`), its score of prompt + completion (label 0) through
    `jaxlm.classify`. The hook for reward models trained with train.objective=reward;
    named as `model:PATH` in train.grpo.reward_funcs."""

    def __init__(self, path: str):
        import jaxlm
        self.path = path
        self.cfg, self.params = jaxlm.load(path)
        if not self.cfg.num_labels:
            raise ConfigError(f"reward model {path} has no score head (model.num_labels=0)")
        self.tokenizer = jaxlm.load_tokenizer(path)
        self.__name__ = f"model:{path}"

    def __call__(self, prompts, completions, **fields):
        import jaxlm
        texts = [(p if isinstance(p, str) else "".join(m["content"] for m in p)) + c
                 for p, c in zip(prompts, completions)]
        ids = [self.tokenizer.encode(t)[: self.cfg.max_seq_len] for t in texts]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_id or 0
        tokens = np.full((len(ids), width), pad, np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for r, i in enumerate(ids):
            tokens[r, :len(i)], mask[r, :len(i)] = i, 1
        scores = jaxlm.classify(self.params, self.cfg, tokens, mask)
        return [float(s) for s in np.asarray(scores)[:, 0]]


def reward_functions(spec: str) -> list[Callable]:
    """train.grpo.reward_funcs -> the callables (module:function, exact:FIELD,
    regex:PATTERN, model:PATH, python)."""
    funcs = []
    for part in (p.strip() for p in _split_specs(spec)):
        if not part:
            continue
        kind, _, arg = part.partition(":")
        if part == "python":
            funcs.append(python_parses)
        elif kind == "exact" and arg:
            funcs.append(_exact(arg))
        elif kind == "regex" and arg:
            funcs.append(_regex(arg))
        elif kind == "model" and arg:
            funcs.append(ClassifierReward(arg))
        elif arg:
            try:
                fn = getattr(_import(kind), arg)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"train.grpo.reward_funcs: cannot import {part} ({e})") from None
            if not callable(fn):
                raise ConfigError(f"train.grpo.reward_funcs: {part} is not callable")
            funcs.append(fn)
        else:
            raise ConfigError(f"train.grpo.reward_funcs: {part!r} is not module:function, "
                              "exact:FIELD, regex:PATTERN, model:PATH or python")
    if not funcs:
        raise ConfigError("train.objective=grpo needs train.grpo.reward_funcs (e.g. "
                          "mymodule:reward, exact:answer, regex:PATTERN)")
    return funcs


def _import(module: str):
    """`module`, found on sys.path or, as `python -m` and uvicorn do, in the current
    directory (a rewards.py beside the command)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    return importlib.import_module(module)


def _split_specs(spec: str) -> list[str]:
    """Comma-separated, except inside a regex: a part that is no `kind:` start joins the
    previous one (`regex:a{1,2}` stays whole)."""
    parts: list[str] = []
    for piece in spec.split(","):
        if parts and not re.match(r"\s*[\w.]+:", piece):
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return parts


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def score(funcs, prompts, completions, fields: dict, where: Sequence[str]) -> np.ndarray:
    """[B, F] rewards, one column per function; a function that raises, returns another
    count or a non-finite value is an InputError naming it (and the row)."""
    out = np.zeros((len(completions), len(funcs)), np.float64)
    for j, fn in enumerate(funcs):
        name = _name(fn)
        try:
            got = fn(prompts=prompts, completions=completions, **fields)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function: one line, its error
            raise InputError(f"reward function {name} raised {type(e).__name__}: {e}") from None
        try:
            values = [float(v) for v in got]
        except (TypeError, ValueError):
            raise InputError(f"reward function {name} returned {type(got).__name__}, not a list "
                             "of floats") from None
        if len(values) != len(completions):
            raise InputError(f"reward function {name} returned {len(values)} values for "
                             f"{len(completions)} completions")
        for r, v in enumerate(values):
            if not math.isfinite(v):
                raise InputError(f"reward function {name} returned {v} for completion {r} "
                                 f"(prompt {where[r]})")
        out[:, j] = values
    return out


def advantages(rewards: np.ndarray, group: int, scale: str) -> np.ndarray:
    """[B] advantages of [B] rewards, groups of `group` consecutive rows: reward minus
    its group's mean, divided by (std + 1e-4) of the group (scale="group") or of the
    batch ("batch"), or not ("none"); std unbiased, as torch's."""
    grouped = rewards.reshape(-1, group)
    centred = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "group":
        std = np.repeat(grouped.std(axis=1, ddof=1), group)
    elif scale == "batch":
        std = np.full_like(rewards, rewards.std(ddof=1))
    else:
        return centred
    return centred / (std + 1e-4)


# ---------------------------------------------------------------- the rollouts


def _pack(arrays: dict) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode()


def _unpack(text: str) -> dict:
    with np.load(io.BytesIO(base64.b64decode(text))) as z:
        return {k: z[k] for k in z.files}


class Sampling(NamedTuple):
    """What a rollout samples, from train.grpo or train.ppo."""
    num_generations: int  # completions per prompt
    max_completion_length: int
    temperature: float
    updates: int  # optimizer steps per rollout (GRPO's num_iterations, PPO's num_ppo_epochs)


def sampling(cfg) -> Sampling:
    """The rollout settings of train.objective: grpo's, or ppo's (one completion each)."""
    if cfg.train.objective == "ppo":
        p = cfg.train.ppo
        return Sampling(1, p.max_completion_length, p.temperature, p.num_ppo_epochs)
    g = cfg.train.grpo
    return Sampling(g.num_generations, g.max_completion_length, g.temperature, g.num_iterations)


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of the rollout at `step` (a function of train.seed and step)."""
    return int(np.random.SeedSequence([seed, ROLLOUT_STREAM, step]).generate_state(1)[0])


class Rollouts:
    """The GRPO batch source of the training loop (module docstring)."""

    def __init__(self, cfg, tokenizer: Tokenizer, template: str | None, records: list[dict],
                 eos_ids: Sequence[int] = ()):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.settings = sampling(cfg)
        self.group = self.settings.num_generations
        self._init_rewards()
        self.records = records
        self.prompt_len = cfg.data.seq_len - self.settings.max_completion_length
        self.ids, self.truncated = [], 0
        for r in records:
            ids = encode_prompt(r, tokenizer, template)
            if len(ids) > self.prompt_len:  # the prompt's end is kept (TRL: left truncation)
                ids, self.truncated = ids[-self.prompt_len:], self.truncated + 1
            self.ids.append(ids)
        self.per_step = cfg.data.batch_size // self.group
        eos = list(eos_ids) or ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
        self.eos = tuple(dict.fromkeys(eos))
        self.epoch, self.index = 0, 0
        self.current: dict | None = None  # the batch of the latest rollout (mu > 1)
        self.stats = {"examples": len(records), "truncated": self.truncated, "dropped": 0}

    def _init_rewards(self) -> None:
        """GRPO's reward functions and their weights."""
        g = self.cfg.train.grpo
        self.funcs = reward_functions(g.reward_funcs)
        weights = g.reward_weights or (1.0,) * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise ConfigError(f"train.grpo.reward_weights has {len(weights)} weights for "
                              f"{len(self.funcs)} reward functions")
        self.weights = np.asarray(weights, np.float64)

    def place(self, mesh, step: int | None = None) -> None:
        """Read what the rollouts hold on the training mesh (GRPO: nothing; PPO: the
        reward model, a jaxlm one's checkpoint `step`: default its latest)."""

    # ---- the data state (checkpointed with the run)

    def get_state(self) -> dict:
        keep = self.current is not None and self.settings.updates > 1
        return {"epoch": self.epoch, "index": self.index,
                "current": _pack(self.current) if keep else None}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.current = _unpack(state["current"]) if state.get("current") else None

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.data.seed, epoch]).permutation(len(self.records))

    def _next_prompts(self) -> list[int]:
        out = []
        while len(out) < self.per_step:
            if self.index >= len(self.records):
                self.epoch, self.index = self.epoch + 1, 0
            out.append(int(self._order(self.epoch)[self.index]))
            self.index += 1
        return out

    # ---- one step's batch

    def batch(self, state, step: int) -> tuple[dict, dict]:
        """(host batch, rollout metrics) for optimizer step `step`: a new rollout every
        num_iterations (PPO: num_ppo_epochs) steps, else the current one again (metrics {})."""
        mu = self.settings.updates
        if step % mu and self.current is not None:
            return self.current, {}
        t0 = time.perf_counter()
        batch, metrics = self.make(state, step)
        self.current = batch
        metrics["rollout_s"] = time.perf_counter() - t0
        return batch, metrics

    def make(self, state, step: int):
        """A new rollout from the train state (GRPO: its policy's samples, scored)."""
        return self.rollout(policy_params(self.cfg, state), step)

    def sample(self, params, step: int, engine_hook: Callable | None = None):
        """The engine's samples of the next prompts with `params` (the policy, in place):
        (chosen record indices, per completion: prompts, completions (text, EOS left out),
        where, rows (prompt ids, completion ids, their log-probs at temperature 1))."""
        cfg = self.cfg
        chosen = self._next_prompts()
        engine = rollout_engine(cfg, params, rollout_seed(cfg.train.seed, step), self.eos,
                                on_refill=engine_hook)
        for i, p in enumerate(chosen):
            engine.add(self.ids[p], row_seed=i, eos_ids=self.eos)
        engine.run()
        prompts, completions, where, rows = [], [], [], []
        for i, req in enumerate(engine.requests):
            record = self.records[chosen[i]]
            for o in req.outputs:
                prompts.append(record["prompt"])
                completions.append(self.tokenizer.decode(
                    [t for t in o.tokens if t not in self.eos]))
                where.append(record.get("where", str(chosen[i])))
                rows.append((self.ids[chosen[i]], o.tokens, o.logprobs or []))
        return chosen, prompts, completions, where, rows

    def rollout(self, params, step: int, engine_hook: Callable | None = None):
        """Sample, score and lay out one GRPO rollout with `params` (the policy, in place)."""
        cfg, g = self.cfg, self.cfg.train.grpo
        chosen, prompts, completions, where, rows = self.sample(params, step, engine_hook)
        fields = {k: [self.records[p].get(k) for p in chosen for _ in range(self.group)]
                  for k in self.records[chosen[0]] if k not in ("prompt", "where")}
        per_func = score(self.funcs, prompts, completions, fields, where)
        total = per_func @ self.weights
        adv = advantages(total, self.group, g.scale_rewards)
        batch = self._layout(rows)
        batch["advantages"] = np.repeat(np.asarray(adv, np.float32)[:, None],
                                        cfg.data.seq_len, axis=1)
        if g.temperature != 1.0:  # the engine's log-probs are at temperature 1
            batch["old_logps"] = np.asarray(rollout_logps(params, cfg.model, batch, g.temperature),
                                            np.float32)
        group_std = total.reshape(-1, self.group).std(axis=1, ddof=1)
        # as TRL logs them: reward_std the mean group std (the batch's with
        # scale_rewards=batch), frac_reward_zero_std the groups that teach nothing
        metrics = {"reward": float(total.mean()),
                   "reward_std": float(total.std(ddof=1) if g.scale_rewards == "batch"
                                       else group_std.mean()),
                   "frac_reward_zero_std": float(np.mean(np.isclose(group_std, 0.0))),
                   "completion_length": float(np.mean([len(r[1]) for r in rows]))}
        for j, fn in enumerate(self.funcs):
            metrics[f"rewards/{_name(fn)}/mean"] = float(per_func[:, j].mean())
            metrics[f"rewards/{_name(fn)}/std"] = float(per_func[:, j].std(ddof=1))
        self.last = {"prompts": prompts, "completions": completions, "rewards": total}
        return batch, metrics

    def _layout(self, rows) -> dict:
        """Rows prompt + completion: the LM arrays, the completion's loss_mask and old
        log-probs at the positions that predict its tokens."""
        s = self.cfg.data.seq_len
        b = len(rows)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        out = {k: np.zeros((b, s), np.int32) for k in
               ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
        out["tokens"][:] = pad
        out["targets"][:] = pad
        out["old_logps"] = np.zeros((b, s), np.float32)
        for r, (prompt, completion, lps) in enumerate(rows):
            seq = list(prompt) + list(completion)
            n, p = len(seq), len(prompt)
            out["tokens"][r, :n] = seq
            out["targets"][r, :n - 1] = seq[1:]
            out["positions"][r, :n] = np.arange(n)
            out["segment_ids"][r, :n] = 1
            out["loss_mask"][r, p - 1:n - 1] = 1
            out["old_logps"][r, p - 1:p - 1 + len(lps)] = lps
        return out


def rollout_engine(cfg, params, seed: int, eos: Sequence[int] = (), **options):
    """The engine of one rollout: data.batch_size slots (every completion at once), G
    samples per request, log-probs recorded, over `params` as they are (no per-layer
    split: the layer scan reads the stacked training weights in place)."""
    from ..config import GenerateConfig
    from ..infer.engine import Engine, Features, pow2
    g = sampling(cfg)
    settings = GenerateConfig(max_new_tokens=g.max_completion_length, temperature=g.temperature,
                              seed=seed, num_return_sequences=g.num_generations)
    feats = Features.of([settings], cfg.model.vocab_size, logprobs=True, split_weights=False,
                        stops=max(4, pow2(len(eos), 1)))
    return Engine(params, cfg.model, settings=settings,
                  max_prompt_len=cfg.data.seq_len - g.max_completion_length,
                  max_new_tokens=g.max_completion_length, slots=cfg.data.batch_size,
                  features=feats, presplit=False, **options)


def policy_params(cfg, state):
    """The params the rollout samples from: the training params themselves, or the
    LoRA adapters merged into the base (once per rollout). (PPO: the policy's part of
    the params, {"policy", "value"}.)"""
    params = state.params["policy"] if cfg.train.objective == "ppo" else state.params
    if not cfg.train.lora.rank:
        return params
    return _merge(cfg)(state.frozen, params)


_MERGES: dict = {}


def _merge(cfg):
    from .lora import merge_lora
    key = (cfg.model, cfg.train)
    if key not in _MERGES:
        _MERGES[key] = jax.jit(lambda base, adapters: merge_lora(base, adapters, cfg))
    return _MERGES[key]


_logps = jax.jit(token_logps, static_argnums=(1, 3))


def rollout_logps(params, mcfg, batch, temperature: float):
    """The rollout policy's [B, S] log-probs of the batch's targets at logits / temperature."""
    return _logps(params, mcfg, {k: batch[k] for k in ("tokens", "targets", "positions",
                                                      "segment_ids")}, temperature)

__all__ = ["Rollouts", "Sampling", "sampling", "load_prompt_records", "reward_functions", "score", "advantages",
           "encode_prompt", "ClassifierReward", "rollout_seed", "policy_params"]
