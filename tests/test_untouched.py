"""The user's model is never mutated: same parameters, buffers, modules, hooks and outputs, whatever we do."""
import pytest
import torch
from torch import nn

import guided_swap as gs
from models import EverySpelling

from conftest import small_densenet, image_batch, make_model


def _snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, id(m), type(m), m.training, getattr(m, "inplace", None)) for name, m in model.named_modules()],
        "params": [id(p) for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_backward_pre_hooks", {}))) for m in model.modules()],
        "devices": {p.device for p in model.parameters()},
        "dtypes": {p.dtype for p in model.parameters()},
    }


def _assert_same(before, after):
    assert before["modules"] == after["modules"]
    assert before["params"] == after["params"]
    assert before["hooks"] == after["hooks"]
    assert before["devices"] == after["devices"] and before["dtypes"] == after["dtypes"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def test_convert_and_explain_leave_the_model_alone():
    for model in (small_densenet(), make_model("vgg11"), EverySpelling().eval()):
        x = image_batch(32)
        expected = model(x)
        before = _snapshot(model)
        for rule in ("guided", "deconvnet"):
            ex = gs.convert(model, layer="auto", rule=rule, example_input=x[:1])
            for _ in range(3):
                ex.explain(x, 1)
        _assert_same(before, _snapshot(model))
        assert torch.equal(model(x), expected)


def test_moving_or_switching_the_explainer_does_not_move_the_model():
    model = make_model("resnet18")
    before = _snapshot(model)
    ex = gs.convert(model, layer="layer4")
    ex.double()
    with pytest.raises(gs.GuidedSwapError, match="eval mode"):
        ex.train()  # it would update BatchNorm buffers that the explainer shares with the model
    ex.eval()
    _assert_same(before, _snapshot(model))
    x = image_batch(32).double()
    assert ex.explain(x, 0).gradient.dtype == torch.float64
    assert all(not m.training for m in model.modules())


def test_in_place_weight_updates_are_seen_by_the_explainer():
    model = make_model("resnet18")
    ex = gs.convert(model, layer="layer4")
    x = image_batch(32)
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
    assert torch.equal(ex(x), model(x))
