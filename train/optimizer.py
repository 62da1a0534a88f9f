"""AdamW with warmup + cosine decay and global-norm clipping."""

import jax
import optax

from ..model.params import is_spec


def learning_rate_schedule(tcfg):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tcfg.learning_rate, warmup_steps=tcfg.warmup_steps,
        decay_steps=max(tcfg.steps, tcfg.warmup_steps + 1),
        end_value=tcfg.learning_rate * tcfg.min_lr_ratio)


def decay_mask(specs):
    """Weight decay on matrices only: not on norm scales or biases (stacked or not)."""
    return jax.tree.map(lambda s: sum(a != "layers" for a in s.axes) >= 2, specs, is_leaf=is_spec)


def make_optimizer(tcfg, specs) -> optax.GradientTransformation:
    parts = []
    if tcfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                             weight_decay=tcfg.weight_decay, mask=decay_mask(specs)))
    return optax.chain(*parts)
