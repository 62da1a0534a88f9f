"""Projections as single 2-D matmuls, and quantized weights dequantized in the matmul.

`dense(x, w, n)` contracts the last n axes of x with the first n axes of w,
flattening everything else: x [..., *in] @ w [*in, *out] -> [..., *out].
An einsum with several batch-like axes ("btd,dhk->bthk") is the same maths,
but its gradients become multi-axis contractions that XLA's CPU backend runs
about 2x slower than the plain GEMMs this produces. Under context parallelism
(the sequence split over devices) the leading axes stay apart instead.

`w` may be a `QuantizedWeight` (model/qformat.py). int8 / fp8 (q [*in, *out], scale
[1.., *out] float32, one per output channel): y = (x @ q.astype(x.dtype)) * scale.
With per-output-channel scales this equals x @ (q * scale) up to float
reassociation, and the only float weight-sized value is the dot's operand
(a convert XLA can fuse into the dot) instead of a dequantized weight buffer.
int4 / nf4 (group-wise scales along the contracted axis): the operand is the
dequantized weight (unpack, table or zero point, group scale), again one
elementwise producer XLA may fuse into the dot, made per layer inside the scan.
Every layer matmul of every family (attention, MLP, the encoder-decoder's
cross-attention, Mixtral's experts: `grouped` / `operand`) goes through here.
"""

import math

import jax
import jax.numpy as jnp

from ..qformat import PER_CHANNEL, QuantizedWeight, dequantize
from ..tap import untap
from ...sharding.context import context_size


def operand(w, dtype):
    """(the matmul operand in `dtype`, a per-output-channel scale [1.., *out] float32 or
    None). An int8 / fp8 weight gives its codes and its scale (applied to the dot's
    output); a group-wise one (int4, nf4) its dequantized weight: group scales vary
    along the contracted axis, so they cannot move past the dot."""
    if isinstance(w, QuantizedWeight):
        if w.fmt in PER_CHANNEL and w.zero is None and w.scale2 is None:
            return w.q.astype(dtype), w.scale
        return dequantize(w, dtype), None
    return w.astype(dtype), None


def dense(x, w, n_contract: int = 1, out_dtype=None):
    """x [..., *in] @ w [*in, *out] -> [..., *out] (w cast to x.dtype; an int8
    QuantizedWeight dequantized in the matmul: its scale multiplies the output; a
    calibration `Tap` reports x first)."""
    w, scale = operand(untap(x, w), x.dtype)
    lead = x.shape[:x.ndim - n_contract]
    k = math.prod(x.shape[x.ndim - n_contract:])
    out = w.shape[n_contract:]
    if context_size() > 1:  # seq split over devices: flattening [B, S] would gather it
        y = jnp.matmul(x.reshape(*lead, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    else:
        y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    if scale is not None:
        y = y * scale.reshape(-1).astype(y.dtype)
    return y.reshape(*lead, *out)


def grouped(rows, w, sizes, row_group):
    """Grouped matmul (`lax.ragged_dot`): rows [T, in] sorted by group, w [G, in, out],
    sizes [G] -> [T, out]; `row_group` [T] is each row's group, which picks an int8 /
    fp8 weight's scale row (scale [G, 1, out])."""
    w, scale = operand(w, rows.dtype)
    y = jax.lax.ragged_dot(rows, w, sizes)
    return y if scale is None else y * scale[:, 0, :].astype(y.dtype)[row_group]


def expert_einsum(spec: str, x, w):
    """`jnp.einsum(spec, x, w)` for per-expert weights w [E, in, out] whose output
    has the expert axis second and `out` last (e.g. "secd,edf->secf"); an int8 / fp8
    weight's scale [E, 1, out] multiplies the output."""
    w, scale = operand(w, x.dtype)
    y = jnp.einsum(spec, x, w)
    return y if scale is None else y * scale[None].astype(y.dtype)
