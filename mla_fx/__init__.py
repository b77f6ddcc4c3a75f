"""mla-fx: rewrite Multi-head Latent Attention models for inference (absorbed MQA over the latent cache).

Importing the package registers the `mla_fx::` torch ops, which a saved absorbed program needs:

    import mla_fx
    model = mla_fx.load("model.absorbed.pt2")  # or an absorbed checkpoint folder
    logits = model(input_ids)
"""

from __future__ import annotations

from mla_fx import ops  # noqa: F401  (registers torch.ops.mla_fx.*)
from mla_fx.spec import MLASpec


def load(path):
    """What `mla-fx absorb` wrote (a `.pt2` or an absorbed checkpoint folder) as an input_ids -> logits module."""
    from mla_fx.load_output import load as load_output

    return load_output(path)


__all__ = ["MLASpec", "__version__", "load"]
__version__ = "0.1.0"
