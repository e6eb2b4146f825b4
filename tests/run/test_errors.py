"""Every way a user can get it wrong gets a clear error that says what to do."""
import inspect
import warnings

import pytest
import torch
from torch import nn

import guided_swap as gs
from models import EverySpelling

from conftest import image_batch, make_model


@pytest.fixture(scope="module")
def ex():
    return gs.convert(make_model("resnet18"), layer="layer4")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow
            return torch.relu(y)
        return y


def test_untraceable_model_names_the_line_and_the_tracer_options():
    with pytest.raises(gs.TraceError) as info:
        gs.convert(Untraceable().eval(), layer="conv", capture="fx")
    message = str(info.value)
    assert "if y.sum() > 0" in message and "test_errors.py" in message
    assert "leaf_modules" in message and "autowrap_functions" in message and "concrete_args" in message


def test_auto_capture_falls_back_and_the_report_names_fx_failing_line():
    ex = gs.convert(Untraceable().eval(), layer="conv")  # capture="auto": fx, then export, then run time
    lines, first = inspect.getsourcelines(Untraceable.forward)
    failing = first + next(i for i, line in enumerate(lines) if "y.sum() > 0" in line)
    assert f"fx failed at test_errors.py:{failing}" in str(ex.report)


def test_leaf_module_option_makes_it_traceable_and_reports_hidden_relus():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Untraceable()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.inner(x)).mean(dim=(2, 3))

    ex = gs.convert(Wrapper().eval(), layer="inner", tracer_kwargs={"leaf_modules": [Untraceable]})
    assert ex.swapped == ("relu",)
    with pytest.raises(TypeError, match="unknown tracer option"):
        gs.convert(Wrapper(), layer=None, tracer_kwargs={"leafs": []})


def test_relus_hidden_in_a_leaf_module_are_reported():
    class Block(nn.Sequential):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block(nn.Conv2d(3, 4, 3), nn.ReLU())

        def forward(self, x):
            return self.block(x).mean(dim=(2, 3))

    with pytest.warns(UserWarning, match="ReLUs inside leaf modules"):
        ex = gs.convert(Net().eval(), layer=None, tracer_kwargs={"leaf_modules": [Block]})
    assert ex.report.hidden_in_leaves == ("block",) and "NOT swapped" in str(ex.report)


def test_unknown_layer_lists_close_names():
    with pytest.raises(gs.LayerError) as info:
        gs.convert(make_model("resnet18"), layer="layer5")
    assert "layer4" in str(info.value) and "layer_names" in str(info.value)
    with pytest.raises(gs.LayerError, match="layer4.1.relu_1"):
        gs.convert(make_model("resnet18"), layer="layer4.1.relu_2")


def test_bad_arguments_to_convert():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gs.convert(lambda x: x)
    with pytest.raises(ValueError, match="rule"):
        gs.convert(make_model("resnet18"), rule="guidedd")
    with pytest.raises(TypeError, match="layer must be"):
        gs.convert(make_model("resnet18"), layer=4)
    with pytest.raises(gs.LayerError, match="repeat"):
        gs.convert(make_model("resnet18"), layer=["layer4", "layer4"])


def test_training_mode_warns():
    with pytest.warns(UserWarning, match="training mode"):
        gs.convert(make_model("resnet18").train(), layer="layer4")


def test_bad_inputs(ex):
    x = image_batch(32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ex.explain(x.numpy())
    with pytest.raises(TypeError, match="floating-point"):
        ex.explain((x * 100).long())
    with pytest.raises(gs.InputError, match="unsqueeze"):
        ex.explain(x[0])
    with pytest.raises(gs.InputError, match="channels"):
        ex.explain(x[:, :1])
    with pytest.raises(gs.InputError, match="float64"):
        ex.explain(x.double())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(gs.InputError, match="NaN"):
        ex.explain(bad)
    with torch.inference_mode(), pytest.raises(gs.GuidedSwapError, match="inference_mode"):
        ex.explain(x)


def test_bad_targets(ex):
    x = image_batch(32)
    with pytest.raises(gs.TargetError, match="out of range"):
        ex.explain(x, 1000)
    with pytest.raises(gs.TargetError, match="out of range"):
        ex.explain(x, [0, -1])
    with pytest.raises(gs.TargetError, match="2 samples"):
        ex.explain(x, [1, 2, 3])
    with pytest.raises(TypeError, match="integer class indices"):
        ex.explain(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(TypeError, match="bool"):
        ex.explain(x, True)
    with pytest.raises(TypeError, match="not understood"):
        ex.explain(x, "cat")
    with pytest.raises(gs.TargetError, match="one score per sample"):
        ex.explain(x, lambda out: out.sum())
    with pytest.raises(gs.TargetError, match="not captured"):
        ex.explain(x, gs.Channel("layer3", 0))
    with pytest.raises(gs.TargetError, match="channel 999"):
        ex.explain(x, gs.Channel("layer4", 999))
    with pytest.raises(ValueError, match="interpolate"):
        ex.explain(x, 0, interpolate="cubic")


def test_no_layer_means_no_cam():
    e = gs.convert(EverySpelling().eval(), layer=None).explain(image_batch(16))
    with pytest.raises(gs.LayerError, match="layer=NAME"):
        e.cam
