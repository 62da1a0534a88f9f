"""`jaxlm.classify`: a sequence classifier's label scores, pooled as Hugging Face pools.

    scores = classify(params, cfg, tokens)         # [B, N] float32 (cfg.num_labels = N)
    scores = classify(params, cfg, tokens, mask)   # padded batch: mask [B, S] (1 = token)

The model is a sequence classifier (model.num_labels > 0: HF
`*ForSequenceClassification`, a reward model); its head is the score head
(`jaxlm.model.layers.score`). The body's hidden state at the pooled position
(`pool_positions`: a decoder's last non-pad token, an encoder's first) is scored.
"""

from __future__ import annotations

import functools

import jax

from ..errors import ConfigError
from .families import forward
from .layers.score import pool_positions, pooled, score


def pooled_scores(params, cfg, hidden, tokens, mask):
    """[B, N] float32: the score head over `hidden` [B, S, D] at `pool_positions`."""
    return score(params, pooled(hidden, pool_positions(tokens, mask, cfg)), cfg)


@functools.partial(jax.jit, static_argnums=1)
def classify(params, cfg, tokens, mask=None, token_types=None):
    """Label scores [B, N] float32 (N = cfg.num_labels; 1: a regression / reward score).

    `mask` [B, S] (1 = token, 0 = padding; None: every position is a token): padding
    is kept out of attention (segment id 0) and out of pooling. Positions are
    arange(S): pad on the right. A decoder pools at the rightmost kept token that is
    not model.pad_token_id (HF's rule, so with the pad id set a right-padded batch
    needs no mask for decoders); an encoder pools its first token ([CLS]).
    `token_types` [B, S]: BERT's segment embeddings (default type 0).
    """
    if not cfg.num_labels:
        raise ConfigError("classify: this model has no score head (model.num_labels=0); a "
                          "Hugging Face *ForSequenceClassification checkpoint loads with one")
    segment_ids = None if mask is None else (mask > 0).astype("int32")
    extra = {} if token_types is None else {"token_types": token_types}
    hidden, _ = forward(params, cfg, tokens, None, segment_ids, return_hidden=True, **extra)
    return pooled_scores(params, cfg, hidden, tokens, mask)
