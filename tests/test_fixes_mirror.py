"""The fx path's mirror gives every module containers of its own: a model that writes a cache while it is
traced keeps its cache, and no fx Proxy ever reaches the user's model."""
import torch
from torch import fx, nn

import guided_swap as gs
from guided_swap.trace import mirror


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
