"""Numbers the kernels and their Python callers share: one definition for C, Triton, Python.

The C kernels receive them as ``-D`` flags at build time (:func:`c_defines`), the Triton
kernels as ``tl.constexpr`` globals built from these values.
"""

from __future__ import annotations

# What a kernel does with one tensor.
MODE_PLAIN = 0  # never project (1-D tensors, scale_invariant=False)
MODE_AUTO = 1  # the cosine test decides
MODE_CHANNEL = 2  # annotated: project per output channel
MODE_LAYER = 3  # annotated: project the whole tensor
MODE_AUTO_TWO_PASS = 4  # the test, its sums gathered in the first of two passes (C only)

# The view a kernel reports for one tensor.
VIEW_AUTO = -1  # not decided yet
VIEW_NONE = 0
VIEW_CHANNEL = 1
VIEW_LAYER = 2
VIEW_NAMES: dict[int, str | None] = {VIEW_NONE: None, VIEW_CHANNEL: "channel",
                                     VIEW_LAYER: "layer"}

MODE_OF_ANNOTATION: dict[object, int] = {
    "auto": MODE_AUTO, "channel": MODE_CHANNEL, "layer": MODE_LAYER, False: MODE_PLAIN,
}


def c_defines() -> list[str]:
    """The constants as C compiler flags (``-DSCALEINV_MODE_PLAIN=0``, ...)."""
    names = ("MODE_PLAIN", "MODE_AUTO", "MODE_CHANNEL", "MODE_LAYER", "MODE_AUTO_TWO_PASS",
             "VIEW_AUTO", "VIEW_NONE", "VIEW_CHANNEL", "VIEW_LAYER")
    return [f"-DSCALEINV_{name}={globals()[name]}" for name in names]
