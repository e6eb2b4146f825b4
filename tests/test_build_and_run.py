"""The seam between building and running: a forward graph of its own, named graph outputs, lazy ``auto``."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import guided_swap as gs

from conftest import image_batch, make_model


class CountCalls(TorchFunctionMode):
    """Counts convolution and linear calls at run time."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, F.linear, torch.conv2d):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _count(fn, x):
    counter = CountCalls()
    with torch.no_grad(), counter:
        fn(x)
    return counter.calls


def test_plain_forward_runs_each_layer_once_even_with_a_fork():
    model = make_model("vgg11")
    ex = gs.convert(model, layer="features.18")
    assert ex.forked  # the explain graph runs the classifier twice ...
    x = image_batch(32)
    assert _count(ex, x) == _count(model, x) == 11  # ... but ex(x) runs it once: 8 convs, 3 linears
    assert torch.equal(ex(x), model(x))


def test_explain_graph_runs_the_forked_tail_twice_and_nothing_else():
    model = make_model("vgg11")
    ex = gs.convert(model, layer="features.18")
    x = image_batch(32)
    assert _count(ex.graph_module, x) == 11 + 3  # the classifier's three linears, copied once


def test_auto_is_resolved_from_the_first_input_when_no_example_is_given():
    class Cifar(nn.Module):
        """A fixed-size model: its Linear head only fits 32-px inputs."""

        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
            self.fc = nn.Linear(16 * 8 * 8, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    model = Cifar().eval()
    ex = gs.convert(model)  # the default layer="auto", no example input
    assert "first explain" in str(ex.report)
    e = ex.explain(torch.randn(2, 3, 32, 32))
    assert e.cam_raw.shape[1:] != (1, 1) and e.cam.shape == (2, 32, 32)
    assert "first explain" not in str(ex.report) and "auto" in ex.report.layers


def test_explanations_slice_and_flatten_through_one_path():
    model = make_model("resnet18")
    x = image_batch(32)
    e = gs.convert(model, layer=["layer3", "layer4"]).explain(x, [1, 2])
    one = e[1]
    assert len(e) == 2 and len(one) == 1 and torch.equal(one.gradient, e.gradient[1:2])
    assert torch.equal(one.cam, e.cam[1:2]) and torch.equal(one.layers["layer3"].cam, e.layers["layer3"].cam[1:2])
    maps = e.to_dict()
    assert torch.equal(maps["layers.layer3.cam"], e.layers["layer3"].cam) and torch.equal(maps["cam"], e.cam)
    assert set(maps) >= {"logits", "target", "score", "gradient", "cam_raw", "cam", "guided_gradcam"}
