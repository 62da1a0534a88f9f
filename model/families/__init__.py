"""Model families: compositions of the one block (`jaxlm.model.block`).

Each family's body maps tokens to the hidden states its head reads, `(hidden,
aux)`; `forward` adds the head (logits in float32) unless `return_hidden`. The head
is the family's LM / MLM head, or with model.num_labels > 0 the score head
(`jaxlm.model.layers.score`: label scores at every position)."""

from ...sharding.pipeline import stage_count
from .decoder import decoder, decoder_pipelined, decoder_specs
from .encoder import encoder, encoder_specs, mlm_logits
from .encoder_decoder import encoder_decoder, encoder_decoder_specs
from ..layers.embeddings import unembed
from ..layers.score import score

FAMILIES = {  # family -> (specs, body, head(params, hidden, cfg) -> logits)
    "decoder": (decoder_specs, decoder, unembed),
    "encoder": (encoder_specs, encoder, lambda params, hidden, cfg: mlm_logits(params, cfg,
                                                                               hidden)),
    "encoder_decoder": (encoder_decoder_specs, encoder_decoder, unembed),
}


def model_specs(cfg):
    return FAMILIES[cfg.family][0](cfg)


def forward(params, cfg, tokens, *args, return_hidden: bool = False, pipeline=None, **kwargs):
    """`forward(params, cfg, tokens, ...) -> (logits [B, S, V] float32, aux)` for
    cfg.family (its body's arguments: a decoder's positions, segment_ids, store; an
    encoder-decoder's decoder_tokens, ...). `return_hidden`: the hidden states the
    head reads instead of logits; a sequence classifier (model.num_labels = N > 0)
    gives each position's label scores [B, S, N]. `pipeline` (a
    `jaxlm.sharding.pipeline.Pipeline`, static; decoders): under a mesh with `stage` > 1
    the layer stack runs pipelined."""
    _, body, head = FAMILIES[cfg.family]
    if cfg.num_labels:
        head = score
    if pipeline is not None and cfg.family == "decoder" and stage_count() > 1:
        hidden, aux = decoder_pipelined(params, cfg, tokens, *args, pipeline=pipeline, **kwargs)
    else:
        hidden, aux = body(params, cfg, tokens, *args, **kwargs)
    return (hidden if return_hidden else head(params, hidden, cfg)), aux

from ...lazy import submodule_getattr as _submodule_getattr  # noqa: E402

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
