"""Model families: compositions of the blocks in model/layers."""

from .decoder import decoder, decoder_specs
from .encoder import encoder, encoder_specs
from .encoder_decoder import encoder_decoder, encoder_decoder_specs

FAMILIES = {"decoder": (decoder_specs, decoder)}
FAMILIES["encoder"] = (encoder_specs, encoder)
FAMILIES["encoder_decoder"] = (encoder_decoder_specs, encoder_decoder)


def model_specs(cfg):
    return FAMILIES[cfg.family][0](cfg)


def forward(params, cfg, tokens, *args, **kwargs):
    """`forward(params, cfg, tokens, ...) -> (logits, aux)` for cfg.family."""
    return FAMILIES[cfg.family][1](params, cfg, tokens, *args, **kwargs)
