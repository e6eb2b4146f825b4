"""The seam between building and running: a forward graph of its own, named graph outputs, lazy ``auto``."""
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import guided_swap as gs
from guided_swap.core.maps import Explanation, LayerMaps

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


# --- ``e[i]`` cuts the model's outputs by what each part is, never because a length happens to equal the batch.

Heads = namedtuple("Heads", "logits aux")


def _explanation(outputs, batch=2):
    A, G = torch.rand(batch, 4, 3, 3), torch.randn(batch, 4, 3, 3)
    return Explanation(logits=torch.randn(batch, 0), target=None, score=torch.zeros(batch),
                       gradient=torch.randn(batch, 3, 12, 12), layers={"l": LayerMaps(A, G, (12, 12))},
                       outputs=outputs)


def test_a_detectors_list_keeps_one_whole_dict_per_image():
    # Image 0 has 2 detections, as many as there are images: its boxes must not be cut.
    detections = [{"boxes": torch.rand(2, 4), "scores": torch.rand(2)},
                  {"boxes": torch.rand(3, 4), "scores": torch.rand(3)}]
    e = _explanation(detections)
    first, second = e[0].outputs, e[1].outputs
    assert len(first) == len(second) == 1
    assert first[0]["boxes"] is detections[0]["boxes"] and second[0]["scores"] is detections[1]["scores"]
    assert e[0:2].outputs == detections


def test_batch_major_outputs_are_cut_part_by_part():
    logits, aux, table = torch.randn(2, 10), torch.randn(2, 5), torch.randn(7, 2)
    e = _explanation({"heads": Heads(logits, aux), "table": table})  # a tuple of two heads, batch 2
    out = e[1].outputs
    assert isinstance(out["heads"], Heads)
    assert torch.equal(out["heads"].logits, logits[1:]) and torch.equal(out["heads"].aux, aux[1:])
    assert out["table"] is table  # its first dimension is not the batch: not batch-major, kept whole
