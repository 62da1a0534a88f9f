"""transformers as the oracle of a parity test: logits of a torch model and of jaxlm on
the same tokens and attention mask, compared on the real (unmasked) positions."""

import jax.numpy as jnp
import numpy as np


def oracles(tokens, mask):
    """(torch_logits, jax_logits, assert_close) whose default tokens / mask are these."""
    def torch_logits(model, tokens=tokens, mask=mask):
        import torch
        with torch.no_grad():
            out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask))
        return out.logits.float().numpy()

    def jax_logits(cfg, params, tokens=tokens, mask=mask):
        from jaxlm.model import forward
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        logits, _ = forward(params, cfg, jnp.array(tokens), positions,
                            jnp.array(mask, jnp.int32))
        return np.asarray(logits)

    def assert_close(ours, ref, mask=mask, tol=1e-4):
        real = np.asarray(mask).astype(bool)
        diff = np.abs(ours[real] - ref[real]).max()
        assert diff <= tol, diff

    return torch_logits, jax_logits, assert_close
