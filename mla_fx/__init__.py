"""mla-fx: rewrite Multi-head Latent Attention models for inference (absorbed MQA over the latent cache).

Importing the package registers the `mla_fx::` torch ops, which a saved absorbed program needs:

    import mla_fx, torch
    logits = torch.export.load("model.absorbed.pt2").module()(input_ids)
"""

from __future__ import annotations

from mla_fx import ops  # noqa: F401  (registers torch.ops.mla_fx.*)
from mla_fx.spec import MLASpec

__all__ = ["MLASpec", "__version__"]
__version__ = "0.1.0"
