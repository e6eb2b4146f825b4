"""Faithfulness metrics of maps, batched on the explainer: ROAD, confidence change, deletion and insertion.

Each is a pure function of ``(explainer, inputs, maps, target)``: the perturbed copies of the batch go through
the explainer's forward (the model's own output) in chunks, under ``torch.no_grad``, and the target is any target
``explain`` takes, resolved once on the clean input (:mod:`.scoring`: a class's softmax probability by
default, a detection's IoU + score for ``gs.Box``). Maps are (B, *spatial) at the input's size: 1D, 2D or 3D.

- :func:`road` (Rong et al. 2022), most-relevant-first, least-relevant-first or combined, equal to
  pytorch-grad-cam's ``ROAD*`` metrics; :func:`road_curves` per percentile; :func:`tie_broken` for maps with
  flat regions;
- :func:`confidence_change`, :func:`drop_in_confidence`, :func:`increase_in_confidence` (pytorch-grad-cam's
  ``CamMultImageConfidenceChange`` family), on maps in [0, 1] (:func:`unit_range` scales raw ones);
- :func:`deletion`, :func:`insertion` (Petsiuk et al. 2018, RISE): a :class:`Curve` with ``.curve`` and ``.auc``.

What each measures and how to read it: docs/metrics.md. ``gs.metrics`` is this module.

>>> import torch, guided_swap as gs
>>> model, x, _ = gs.demo.load_demo()
>>> ex = gs.convert(model, layer="auto")
>>> e = ex.explain(x[:2])
>>> gs.metrics.insertion(ex, x[:2], e.cam, steps=4).curve.shape
torch.Size([2, 5])
"""
from .baselines import BASELINES, baseline, blur
from .causal import Curve, auc, deletion, insertion, tie_broken
from .confidence import confidence_change, drop_in_confidence, increase_in_confidence, unit_range
from .imputation import impute, neighbour_weights
from .road import ORDERS, PERCENTILES, road, road_curves
from .scoring import SCORES

__all__ = ["road", "road_curves", "confidence_change", "drop_in_confidence", "increase_in_confidence", "unit_range",
           "deletion", "insertion", "Curve", "auc", "tie_broken", "impute", "neighbour_weights", "baseline", "blur",
           "BASELINES", "ORDERS", "PERCENTILES", "SCORES"]
