"""The user's model is never mutated: same parameters, buffers, modules, hooks and outputs, whatever we do."""
import pytest
import torch
from torch import fx, nn

import guided_swap as gs
from guided_swap.capture.graph.trace import mirror

from conftest import image_batch, make_model, small_densenet
from models import EverySpelling


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


# --- The fx path's mirror gives every module containers of its own: a model that writes a cache while it is

class CachingNet(nn.Module):
    """Writes into a dict, a list and a list inside a dict on every forward (as caching models do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.cache = {"kept": "user value"}
        self.history = []
        self.state = {"seen": []}

    def forward(self, x):
        x = self.relu(self.conv(x))
        self.cache["last"] = x
        self.history.append(x)
        self.state["seen"].append(x)
        return self.fc(x.mean(dim=(2, 3)))


def _values(obj, seen=None):
    """Every object reachable through dicts, lists, tuples and sets from ``obj``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple, set)) else ()
    for item in items:
        yield from _values(item, seen)


def test_a_model_that_writes_caches_while_traced_is_left_alone():
    torch.manual_seed(0)
    model = CachingNet().eval()
    x = torch.randn(2, 3, 16, 16)
    ex = gs.convert(model, layer="conv", capture="fx")
    assert ex.report.capture.startswith("fx")
    e = ex.explain(x, target=[0, 1])
    assert e.gradient.abs().sum() > 0
    for module in model.modules():
        for value in _values(vars(module)):
            assert not isinstance(value, fx.Proxy), f"a Proxy was left in {type(module).__name__}"
    assert model.cache == {"kept": "user value"}
    assert model.history == [] and model.state == {"seen": []}


def test_mirror_copies_containers_but_shares_tensors():
    model = CachingNet()
    model.history.append(torch.ones(1))
    copy = mirror(model)
    assert copy.cache is not model.cache and copy.cache == model.cache
    assert copy.state["seen"] is not model.state["seen"]
    assert copy.history is not model.history and copy.history[0] is model.history[0]  # tensors are not copied
    assert copy._forward_hooks is not model._forward_hooks
    assert copy.conv.weight is model.conv.weight and copy.conv is not model.conv
