"""A weight that reports its matmul's input: calibration's probe.

`Tap(w, name, sink)` stands for the weight `w` (an array); `dense` (layers/dense.py)
hands each input x it is multiplied with to `sink(name, x)` on the host through
`jax.debug.callback` and multiplies with `w` as usual. GPTQ / AWQ calibration
(`model/calibration.py`) wraps the weights it calibrates in Taps for one pass of a
layer over the calibration batches and reads the Hessians the sink accumulated;
params without Taps are untouched, so the block needs no calibration mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tap:
    w: Any  # the weight
    name: str = dataclasses.field(metadata=dict(static=True), default="")
    sink: Callable = dataclasses.field(metadata=dict(static=True), default=None)

    @property
    def shape(self):
        return self.w.shape


def untap(x, w):
    """w itself; a Tap's input x reported to its sink first."""
    if isinstance(w, Tap):
        jax.debug.callback(w.sink, w.name, x)
        return w.w
    return w
