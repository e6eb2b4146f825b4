"""ReLU and ReLU6 in disguise (clamp, clamp_min, threshold, hardtanh) get the rule; look-alikes are reported."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_swap as gs
from guided_swap.checks import reference
from models import DISGUISED_LEFT_ALONE, DISGUISED_SWAPS, DisguisedRectifiers

from conftest import assert_nontrivial, image_batch, relative_error


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DisguisedRectifiers().eval()


def test_every_disguised_spelling_is_swapped_and_counted(model):
    ex = gs.convert(model, layer="conv3")
    assert {s.name: s.spelling for s in ex.report.swapped} == DISGUISED_SWAPS
    assert len(ex.swapped) == reference.count_relu_calls(model, image_batch(16)) == 17
    inplace = {s.name for s in ex.report.swapped if s.inplace}
    assert inplace == {"threshold_inplace", "clamp_", "clamp__1", "clamp_min_", "threshold_", "clamp__2"}


def test_lookalikes_without_a_rule_are_reported(model):
    report = gs.convert(model, layer="conv3").report
    assert dict(report.left_alone) == DISGUISED_LEFT_ALONE
    assert "torch.where(cond, x, 0)" in str(report) and "torch.maximum(x, 0)" in str(report)


@pytest.mark.parametrize("rule", ["guided", "deconvnet", "gradient"])
def test_disguised_spellings_match_the_reference(model, rule):
    x = image_batch(16)
    ex = gs.convert(model, layer="conv3", rule=rule)
    assert torch.equal(ex(x), model(x))
    e = ex.explain(x, target=[2, 5])
    expected = reference.input_gradient(model, x, [2, 5], rule)
    assert_nontrivial(expected)
    assert_nontrivial(e.cam_raw)
    assert relative_error(e.gradient, expected) <= 1e-5
    assert relative_error(e.cam_raw, reference.gradcam(model, x, [2, 5], model.conv3)) <= 1e-5


def test_the_rule_really_acts_on_disguised_spellings(model):
    x = image_batch(16)
    guided = gs.convert(model, layer=None).explain(x, 1).gradient
    plain = gs.convert(model, layer=None, rule="gradient").explain(x, 1).gradient
    assert relative_error(guided, plain) > 1e-2


class NotRectifiers(nn.Module):
    """Bounds that are not ReLU's or ReLU6's: none may be swapped, by the table or by the reference."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.modules_ = nn.ModuleList([nn.Threshold(0.0, -1.0), nn.Threshold(0.1, 0.0), nn.Hardtanh(0.0, 1.0),
                                       nn.Hardtanh(-6.0, 6.0)])

    def forward(self, x):
        x = self.conv(x)
        zero = torch.zeros(1)
        outs = [x.clamp(min=0.1), x.clamp(min=-1.0), torch.clamp(x, 0, 1), x.clamp(max=0), x.clamp(min=zero),
                torch.clamp_min(x, 1), F.threshold(x, 0.0, 1.0), F.threshold(x, 0.5, 0.0), F.hardtanh(x, 0, 5),
                x.clamp(0, 6.5), torch.clamp(x, False, 6)]
        outs += [module(x) for module in self.modules_]
        return sum(o.mean(dim=(2, 3)) for o in outs)


def test_bounds_that_are_not_rectifiers_are_left_alone():
    model = NotRectifiers().eval()
    assert gs.convert(model, layer=None).swapped == ()
    assert reference.count_relu_calls(model, image_batch(16)) == 0


class Rectified(nn.Module):
    """A second rectifier right after a ReLU, so its input holds exact zeros: spelled as clamp or as relu."""

    def __init__(self, clamp: bool):
        super().__init__()
        self.clamp = clamp
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = x.clamp(min=0) if self.clamp else torch.relu(x)
        return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_a_clamp_on_exact_zeros_gets_relus_mask(rule):
    """clamp's own backward passes the gradient where x == 0; as a rectifier it gets ReLU's mask, like the reference."""
    torch.manual_seed(0)
    as_clamp = Rectified(clamp=True).eval()
    as_relu = Rectified(clamp=False).eval()
    as_relu.load_state_dict(as_clamp.state_dict())
    x = image_batch(16)
    ours = gs.convert(as_clamp, layer=None, rule=rule).explain(x, [0, 1]).gradient
    assert_nontrivial(ours)
    assert torch.equal(ours, gs.convert(as_relu, layer=None, rule=rule).explain(x, [0, 1]).gradient)
    assert relative_error(ours, reference.input_gradient(as_clamp, x, [0, 1], rule)) <= 1e-5
