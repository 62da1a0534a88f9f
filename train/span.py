"""T5 span corruption (`train.objective: span`): packed rows -> encoder inputs + decoder targets.

A packed row of L tokens (documents laid end to end, as the pipeline packs
them) is corrupted as in T5's `random_spans_noise_mask` /
`noise_span_to_unique_sentinel`:

* round(L * noise_density) tokens are noise (at least 1, at most L - 1), in
  round(noise / mean_span_length) spans (at least 1); the noise and the kept
  tokens are each cut into that many non-empty runs at random and interleaved
  kept, noise, kept, noise, ... (a row starts with kept tokens and ends with
  noise);
* inputs  = the kept tokens, each noise span replaced by one sentinel;
* targets = for each noise span, its sentinel followed by its tokens.

Sentinels count down from the top of the vocabulary: span k is
`vocab_size - 1 - k` (T5's `<extra_id_k>`), so the tokenizer must leave the
top `sentinels(...)` ids unused (the training loop trains it that much
smaller). Unlike T5 no EOS is appended: the rows already hold each
document's EOS.

    "I like [to eat] pizza and [pasta]"  (L = 8, 2 spans)
    inputs  = I like <s0> pizza and <s1>
    targets = <s0> to eat <s1> pasta

Sizes: `span_lengths(seq_len, ...)` gives the raw row length L (the largest
whose inputs fit in seq_len, as T5's `random_spans_helper`) and the targets
length T; the pipeline packs rows of L tokens and every batch is
{tokens, segment_ids: [B, seq_len]; decoder_tokens, decoder_segment_ids,
targets, loss_mask: [B, T]} with decoder_tokens = targets shifted right
behind the start id (T5: pad = 0). A short final row is corrupted over its
valid tokens only, the rest is padding (segment 0, loss_mask 0).

Randomness: each row's spans come from a generator seeded by (seed, a hash
of the row's tokens), so the transform is a pure function of the batch: the
data iterator's get_state/set_state still resume exactly, and a row is
corrupted the same way whenever it is seen (the pipeline shuffles documents
each epoch, so rows differ between epochs anyway).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from ..errors import ConfigError


def noise_counts(length: int, density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` tokens (length >= 2)."""
    noise = min(max(int(np.round(length * density)), 1), length - 1)
    spans = max(int(np.round(noise / mean_span_length)), 1)
    return noise, min(spans, length - noise)


def corrupted_lengths(length: int, density: float, mean_span_length: float) -> tuple[int, int]:
    """(inputs length, targets length) after corrupting `length` tokens."""
    noise, spans = noise_counts(length, density, mean_span_length)
    return length - noise + spans, noise + spans


def span_lengths(seq_len: int, density: float, mean_span_length: float) -> tuple[int, int]:
    """(raw row length L, targets length T): the largest L whose inputs fit in seq_len."""
    if seq_len < 2:
        raise ValueError(f"span corruption needs seq_len >= 2, got {seq_len}")
    length = seq_len
    while corrupted_lengths(length + 1, density, mean_span_length)[0] <= seq_len:
        length += 1
    return length, corrupted_lengths(length, density, mean_span_length)[1]


def sentinels(seq_len: int, density: float, mean_span_length: float) -> int:
    """How many sentinel ids a row of the pipeline uses at most (top of the vocab)."""
    length, _ = span_lengths(seq_len, density, mean_span_length)
    return noise_counts(length, density, mean_span_length)[1]


def _segmentation(n_items: int, n_segments: int, rng) -> np.ndarray:
    """A random split of n_items into n_segments non-empty runs: their lengths."""
    first = np.zeros(n_items, bool)
    first[1 + rng.choice(n_items - 1, n_segments - 1, replace=False)] = True
    return np.bincount(np.cumsum(first), minlength=n_segments)


def noise_mask(length: int, density: float, mean_span_length: float, rng) -> np.ndarray:
    """bool [length]: the noise tokens (kept first, noise last, spans interleaved)."""
    noise, spans = noise_counts(length, density, mean_span_length)
    runs = np.stack([_segmentation(length - noise, spans, rng),
                     _segmentation(noise, spans, rng)], axis=1).reshape(-1)
    return np.repeat(np.arange(2 * spans) % 2 == 1, runs)


def corrupt(tokens: np.ndarray, vocab_size: int, density: float, mean_span_length: float,
            rng) -> tuple[np.ndarray, np.ndarray]:
    """1-D tokens -> (inputs, targets), int32, with sentinels vocab_size - 1 - k."""
    tokens = np.asarray(tokens, np.int32)
    noise = noise_mask(len(tokens), density, mean_span_length, rng)
    starts = noise & ~np.concatenate([[False], noise[:-1]])  # first token of each noise span
    sentinel = (vocab_size - np.cumsum(starts)).astype(np.int32)  # span k -> vocab_size - 1 - k
    inputs = np.where(starts, sentinel, tokens)[~noise | starts]
    targets = np.insert(tokens[noise], np.flatnonzero(starts[noise]), sentinel[starts])
    return inputs, targets.astype(np.int32)


def uncorrupt(inputs, targets, vocab_size: int, n_sentinels: int) -> np.ndarray:
    """The original row from (inputs, targets): each sentinel in the inputs
    replaced by the tokens after the same sentinel in the targets."""
    is_sentinel = lambda t: vocab_size - n_sentinels <= t < vocab_size
    spans, current = {}, None
    for t in targets:
        if is_sentinel(t):
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs:
        out += spans[int(t)] if is_sentinel(t) else [int(t)]
    return np.asarray(out, np.int32)


def _row_rng(seed: int, tokens: np.ndarray):
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, np.int32).tobytes(),
                             digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def span_batch(batch: dict, *, seq_len: int, vocab_size: int, density: float,
               mean_span_length: float, seed: int, pad_id: int = 0,
               decoder_start_id: int = 0) -> dict:
    """A packed batch {tokens, segment_ids: [B, L]} -> the span-corruption batch.

    Returns int32 tokens / segment_ids [B, seq_len] (encoder), decoder_tokens /
    decoder_segment_ids / targets [B, T] and float32 loss_mask [B, T]."""
    rows, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    b = rows.shape[0]
    _, t_len = span_lengths(seq_len, density, mean_span_length)
    out = {"tokens": np.full((b, seq_len), pad_id, np.int32),
           "segment_ids": np.zeros((b, seq_len), np.int32),
           "decoder_tokens": np.full((b, t_len), pad_id, np.int32),
           "decoder_segment_ids": np.zeros((b, t_len), np.int32),
           "targets": np.full((b, t_len), pad_id, np.int32),
           "loss_mask": np.zeros((b, t_len), np.float32)}
    for r in range(b):
        valid = rows[r][segments[r] > 0]
        if len(valid) < 2:
            continue
        inputs, targets = corrupt(valid, vocab_size, density, mean_span_length,
                                  _row_rng(seed, valid))
        if len(inputs) > seq_len or len(targets) > t_len:
            raise ValueError(f"span corruption: a row of {len(valid)} tokens gives "
                             f"{len(inputs)} inputs / {len(targets)} targets, more than "
                             f"{seq_len} / {t_len} (rows must be at most "
                             f"{span_lengths(seq_len, density, mean_span_length)[0]} tokens)")
        n, m = len(inputs), len(targets)
        out["tokens"][r, :n] = inputs
        out["segment_ids"][r, :n] = 1
        out["targets"][r, :m] = targets
        out["decoder_tokens"][r, 0] = decoder_start_id
        out["decoder_tokens"][r, 1:m] = targets[:-1]
        out["decoder_segment_ids"][r, :m] = 1
        out["loss_mask"][r, :m] = 1.0
    return out


class SpanBatches(Iterator[dict]):
    """Wraps a packed-batch iterator (rows of `span_lengths(...)[0]` tokens) and
    corrupts every batch; get_state/set_state are the wrapped iterator's."""

    def __init__(self, batches, **settings):
        self._batches = batches
        self._settings = settings

    def __next__(self) -> dict:
        return span_batch(next(self._batches), **self._settings)

    def get_state(self):
        return self._batches.get_state()

    def set_state(self, state) -> None:
        self._batches.set_state(state)


def span_settings(cfg, tokenizer) -> dict:
    """The `span_batch` settings of a run config (train.*, data.seq_len, model.vocab_size);
    ConfigError if the tokenizer's ids reach the sentinels."""
    free = cfg.model.vocab_size - reserved_ids(cfg)
    if tokenizer.vocab_size > free:
        raise ConfigError(
            f"train.objective=span: the tokenizer has {tokenizer.vocab_size} ids but the top "
            f"{reserved_ids(cfg)} of model.vocab_size={cfg.model.vocab_size} are span sentinels; "
            f"set model.vocab_size >= {tokenizer.vocab_size + reserved_ids(cfg)}")
    return {"seq_len": cfg.data.seq_len, "vocab_size": cfg.model.vocab_size,
            "density": cfg.train.span_noise_density,
            "mean_span_length": cfg.train.span_mean_length, "seed": cfg.data.seed,
            "pad_id": tokenizer.pad_id, "decoder_start_id": tokenizer.pad_id}


def wrap_batches(cfg, tokenizer, batches):
    """The training batch iterator for cfg.train.objective: corrupted for span, else as is."""
    if cfg.train.objective != "span":
        return batches
    return SpanBatches(batches, **span_settings(cfg, tokenizer))


def map_batches(cfg, tokenizer, batches: list) -> list:
    """A list of (eval) batches for cfg.train.objective: corrupted for span, else as is."""
    if cfg.train.objective != "span":
        return batches
    settings = span_settings(cfg, tokenizer)
    return [span_batch(b, **settings) for b in batches]


def row_length(cfg) -> int:
    """Tokens per packed row the pipeline must produce for this run's objective."""
    if cfg.train.objective != "span":
        return cfg.data.seq_len
    return span_lengths(cfg.data.seq_len, cfg.train.span_noise_density,
                        cfg.train.span_mean_length)[0]


def reserved_ids(cfg) -> int:
    """Ids at the top of the vocab the tokenizer must leave free (span sentinels)."""
    if cfg.train.objective != "span":
        return 0
    return sentinels(cfg.data.seq_len, cfg.train.span_noise_density, cfg.train.span_mean_length)


__all__ = ["span_lengths", "sentinels", "noise_mask", "corrupt", "uncorrupt", "span_batch",
           "SpanBatches", "span_settings", "wrap_batches", "map_batches", "row_length",
           "reserved_ids"]
