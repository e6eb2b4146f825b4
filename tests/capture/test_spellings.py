"""Every ReLU spelling is swapped, nothing else is, and the maps equal the fx-free reference."""
import pytest
import torch

import guided_swap as gs
from guided_swap.checks import reference
from models import EVERY_SPELLING_SWAPS, EverySpelling, FunctionalResNet

from conftest import assert_nontrivial, image_batch, lively_targets, randomise_batchnorm, relative_error


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return EverySpelling().eval()


def test_every_spelling_is_swapped_under_its_name(toy):
    ex = gs.convert(toy, layer="conv3")
    swapped = {s.name: s.spelling for s in ex.report.swapped}
    assert swapped == EVERY_SPELLING_SWAPS
    assert len(ex.swapped) == reference.count_relu_calls(toy, image_batch(16)) == 11
    inplace = {s.name for s in ex.report.swapped if s.inplace}
    assert inplace == {"relu_inplace", "relu_2", "relu_3", "relu_", "relu__1", "relu6_1"}


def test_other_activations_are_reported_left_alone(toy):
    report = gs.convert(toy, layer="conv3").report
    assert dict(report.left_alone) == {"silu": "nn.SiLU", "sigmoid": "torch.sigmoid"}
    assert "left alone" in str(report) and "nn.SiLU" in str(report)


@pytest.mark.parametrize("rule", ["guided", "deconvnet", "gradient"])
def test_every_spelling_matches_the_reference(toy, rule):
    x = image_batch(16)
    ex = gs.convert(toy, layer="conv3", rule=rule)
    assert torch.equal(ex(x), toy(x))
    e = ex.explain(x, target=[2, 5])
    expected = reference.input_gradient(toy, x, [2, 5], rule)
    assert_nontrivial(expected)
    assert_nontrivial(e.cam_raw)
    assert relative_error(e.gradient, expected) <= 1e-5
    assert relative_error(e.cam_raw, reference.gradcam(toy, x, [2, 5], toy.conv3)) <= 1e-5


def test_rules_really_differ(toy):
    x = image_batch(16)
    grads = {rule: gs.convert(toy, layer=None, rule=rule).explain(x, 1).gradient for rule in gs.rules()}
    assert relative_error(grads["guided"], grads["gradient"]) > 1e-2
    assert relative_error(grads["deconvnet"], grads["guided"]) > 1e-2
    assert (grads["guided"] >= 0).float().mean() < 1  # not a trivial all-positive map either


def test_unused_inplace_results_still_act():
    """``torch.relu_(y)`` with its result unused must still zero y for later code (no dead-code removal)."""
    torch.manual_seed(0)
    toy = EverySpelling().eval()
    ex = gs.convert(toy, layer=None)
    for graph in (ex.graph_module, ex.forward_module):
        assert graph.code.count("rectify(") == 11 and "inplace = True" in graph.code


def test_handwritten_functional_resnet_block():
    torch.manual_seed(0)
    model = randomise_batchnorm(FunctionalResNet()).eval()
    x = image_batch(32)
    ex = gs.convert(model, layer="layer2")
    assert ex.forked  # the MLP head's ReLU follows the layer
    assert len(ex.swapped) == reference.count_relu_calls(model, x) == 10
    target = lively_targets(model, x, model.layer2)
    e = ex.explain(x, target)
    assert_nontrivial(e.gradient)
    assert_nontrivial(e.cam_raw)
    assert relative_error(e.gradient, reference.input_gradient(model, x, target)) <= 1e-5
    assert relative_error(e.cam_raw, reference.gradcam(model, x, target, model.layer2)) <= 1e-5
    assert torch.equal(e.logits, model(x))
