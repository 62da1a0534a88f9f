"""Model families: compositions of the blocks in model/layers."""

from jaxlm.model.families.decoder import decoder, decoder_specs

FAMILIES = {"decoder": (decoder_specs, decoder)}


def model_specs(cfg):
    return FAMILIES[cfg.family][0](cfg)


def forward(params, cfg, tokens, *args, **kwargs):
    """`forward(params, cfg, tokens, ...) -> (logits, aux)` for cfg.family."""
    return FAMILIES[cfg.family][1](params, cfg, tokens, *args, **kwargs)
