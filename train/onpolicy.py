"""On-policy distillation data (train.distill.on_policy = TRL GKD's lmbda).

Before a step, with probability lmbda, drawn from (train.seed, step) so that a resumed
run draws what an uninterrupted one does, the batch's completions are replaced by the
student's own samples: every example (a segment of a packed SFT row) keeps its prompt
(the tokens up to its first loss token), and the engine (`jaxlm.generate`, over the live
training params: in-process, no copy, no resharding) continues it by at most as many
tokens as its completion had, so the row keeps its layout. The loss is then on the
generated tokens (EOS included); positions a shorter sample leaves free become padding.
Sampling follows TRL's GKD: train.distill.temperature, no top-k / top-p, with a seed
drawn from (train.seed, step) too.
"""

from __future__ import annotations

import numpy as np

ON_POLICY_STREAM = 0x6F6E706F  # "onpo": this module's stream of train.seed


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, ON_POLICY_STREAM, step])


def is_on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether the step `step` (0-based: the state's step before it runs) trains on the
    student's samples."""
    return lmbda > 0 and (lmbda >= 1 or _rng(seed, step).random() < lmbda)


def _examples(batch):
    """(row, prompt start, last prompt position, last segment position) of each example
    of a packed batch that has a loss token."""
    out = []
    for r, (seg, mask) in enumerate(zip(batch["segment_ids"], batch["loss_mask"])):
        for s in np.unique(seg[seg > 0]):
            idx = np.nonzero(seg == s)[0]
            loss = np.nonzero(mask[idx] > 0)[0]
            if len(loss):
                out.append((r, int(idx[0]), int(idx[loss[0]]), int(idx[-1])))
    return out


def _groups(prompts, budgets, max_seq_len: int) -> list[list[int]]:
    """Example indices in groups whose longest prompt + largest budget fit the model
    (each example alone fits its row, so within model.max_seq_len)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    groups, longest, most = [], 0, 0
    for i in order:
        if groups and max(longest, len(prompts[i])) + max(most, budgets[i]) <= max_seq_len:
            groups[-1].append(i)
            longest, most = max(longest, len(prompts[i])), max(most, budgets[i])
        else:
            groups.append([i])
            longest, most = len(prompts[i]), budgets[i]
    return groups


def on_policy_batch(params, mcfg, batch, *, seed: int, step: int, temperature: float,
                    eos_id, pad_id: int, max_len: int | None = None, slots: int = 8):
    """`batch` (host numpy, the five arrays) with each example's completion replaced by a
    sample of the model `params` / `mcfg` (see the module docstring). The engine runs
    with a contiguous cache of `max_len` (the row length) per slot, `slots` slots
    (refilled as examples finish) and a fixed round trip, so that its compiled loop
    keeps its shapes from step to step."""
    from ..infer.generate import generate
    examples = _examples(batch)
    if not examples:
        return batch
    prompts = [batch["tokens"][r, a:p + 1] for r, a, p, _ in examples]
    budgets = [end - p for _, _, p, end in examples]
    key = int(_rng(seed, step).integers(2 ** 31))
    new = {k: np.array(v, copy=True) for k, v in batch.items()}
    for group in _groups(prompts, budgets, mcfg.max_seq_len):
        out = generate(params, mcfg, [prompts[i] for i in group],
                       max_new_tokens=[budgets[i] for i in group], temperature=temperature,
                       seed=key, row_seeds=group, eos_id=eos_id, max_len=max_len,
                       cache="contiguous", slots=slots,
                       engine_options={"steps_per_call": 16, "presplit": False})
        for i, row, n in zip(group, out.tokens, out.lengths):
            (r, a, p, end), n = examples[i], int(n)
            new["tokens"][r, p + 1:p + 1 + n] = row[:n]
            new["targets"][r, p:p + n] = row[:n]
            new["loss_mask"][r, a:end + 1] = 0
            new["loss_mask"][r, p:p + n] = 1
            new["targets"][r, p + n:end + 1] = pad_id
            free = slice(p + 1 + n, end + 1)  # what a shorter sample leaves: padding
            new["tokens"][r, free], new["segment_ids"][r, free] = pad_id, 0
            new["positions"][r, free] = 0
    return new


def on_policy_hook(cfg, tokenizer):
    """`(params, host_batch, step) -> (host_batch, on_policy 0/1)` for the train loop, or
    None when train.distill.on_policy is 0."""
    d = cfg.train.distill
    if cfg.train.objective != "distill" or not d.on_policy:
        return None

    import jax

    from ..errors import ConfigError
    from ..sharding.distributed import local_batch_size
    if jax.process_count() > 1:  # each process's engine would sample its own rows
        raise ConfigError(f"train.distill.on_policy={d.on_policy} is single-process for now "
                          f"({jax.process_count()} processes): set train.distill.on_policy=0")
    slots = local_batch_size(cfg.data.batch_size)  # about one example per row at a time

    def hook(params, batch, step):
        if not is_on_policy_step(cfg.train.seed, step, d.on_policy):
            return batch, 0
        return on_policy_batch(params, cfg.model, batch, seed=cfg.train.seed, step=step,
                               temperature=d.temperature, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, max_len=cfg.data.seq_len,
                               slots=slots), 1
    return hook
