"""Rules are objects a user can write: a rule written outside the package equals the built-in one."""
import os

import pytest
import torch

import guided_swap as gs
from guided_swap.core.rules import BUILT_IN

from conftest import assert_nontrivial, image_batch, lively_targets, make_model, relative_error


class OutsideGuided(gs.Rule):
    """Guided backprop as a user writes it, knowing nothing of ReLU6 or in-place calls."""

    name = "outside-guided"

    def backward(self, grad_output, output):
        return grad_output.clamp(min=0) * (output > 0)


class OutsideDeconvnet(gs.Rule):
    name = "outside-deconvnet"
    needs_output = False

    def backward(self, grad_output, output):
        return grad_output.clamp(min=0)


class Halved(gs.Rule):
    """A rule no built-in has: half the ordinary gradient. Its maps must differ from every built-in's."""

    name = "halved"

    def backward(self, grad_output, output):
        return 0.5 * grad_output * (output > 0)


CASES = [("resnet18", "layer4"), ("mobilenet_v2", "features.17")]  # ReLU, and ReLU6 in place


@pytest.fixture(scope="module", params=CASES, ids=[name for name, _ in CASES])
def case(request):
    name, layer = request.param
    model = make_model(name)
    x = image_batch(64)
    return model, layer, x, lively_targets(model, x, model.get_submodule(layer))


@pytest.mark.parametrize("builtin,outside", [("guided", OutsideGuided()), ("deconvnet", OutsideDeconvnet())])
def test_a_rule_written_outside_equals_the_builtin(case, builtin, outside):
    model, layer, x, target = case
    expected = gs.convert(model, layer=layer, rule=builtin).explain(x, target)
    actual = gs.convert(model, layer=layer, rule=outside).explain(x, target)
    assert_nontrivial(expected.gradient)
    assert_nontrivial(expected.cam_raw, 0.02)
    assert relative_error(actual.gradient, expected.gradient) <= 1e-6
    assert relative_error(actual.guided_gradcam, expected.guided_gradcam) <= 1e-6
    assert torch.equal(actual.cam_raw, expected.cam_raw)
    assert actual.rule == outside.name


def test_a_user_rule_equals_the_fx_free_reference(case):
    from guided_swap.checks import reference

    model, layer, x, target = case
    e = gs.convert(model, layer=layer, rule=Halved()).explain(x, target)
    expected = reference.input_gradient(model, x, target, Halved())
    assert_nontrivial(expected)
    assert relative_error(e.gradient, expected) <= 1e-5
    guided = gs.convert(model, layer=layer).explain(x, target).gradient
    assert relative_error(e.gradient, guided) > 0.1


def test_a_registered_rule_works_by_name_and_is_listed():
    rule = gs.register_rule(OutsideGuided())
    try:
        assert "outside-guided" in gs.rules() and gs.rules()[:3] == BUILT_IN
        model = make_model("resnet18")
        x = image_batch(32)
        by_name = gs.convert(model, layer="layer4", rule="outside-guided").explain(x, [1, 2])
        by_object = gs.convert(model, layer="layer4", rule=rule).explain(x, [1, 2])
        assert torch.equal(by_name.gradient, by_object.gradient)
        with pytest.raises(gs.RuleError, match="already registered"):
            gs.register_rule(OutsideGuided.__new__(OutsideGuided))
    finally:
        gs.unregister_rule("outside-guided")
    assert "outside-guided" not in gs.rules()
    with pytest.raises(gs.RuleError, match="not a registered rule"):
        gs.convert(make_model("resnet18"), layer="layer4", rule="outside-guided")


def test_malformed_rules_are_refused_with_a_reason():
    class NoName(gs.Rule):
        def backward(self, grad_output, output):
            return grad_output

    class NoBackward(gs.Rule):
        name = "no-backward"

    with pytest.raises(gs.RuleError, match="no name"):
        gs.register_rule(NoName())
    with pytest.raises(gs.RuleError, match="does not define backward"):
        gs.register_rule(NoBackward())
    with pytest.raises(TypeError, match="pass an instance"):
        gs.convert(make_model("resnet18"), layer="layer4", rule=OutsideGuided)
    with pytest.raises(gs.RuleError, match="built-in"):
        gs.unregister_rule("guided")


def test_a_user_rule_survives_save_load_and_export(tmp_path):
    model = make_model("resnet18")
    x = image_batch(32)
    ex = gs.convert(model, layer="layer4", rule=Halved())
    expected = ex.explain(x, [1, 2])
    path = os.path.join(tmp_path, "halved.gsx")
    ex.save(path)
    with pytest.raises(gs.LoadError, match=r"'halved' .*not a built-in rule. Register it .*trust=True"):
        gs.load(path)  # a user's rule is pickled in the file: not unpickled without trust
    loaded = gs.load(path, trust=True)
    assert loaded.rule == Halved() and torch.equal(loaded.explain(x, [1, 2]).gradient, expected.gradient)
    registered = gs.register_rule(Halved())  # registered here: found by name, nothing from the file is unpickled
    try:
        again = gs.load(path)
        assert again.rule is registered and torch.equal(again.explain(x, [1, 2]).gradient, expected.gradient)
    finally:
        gs.unregister_rule("halved")
    program = gs.export_program(ex, x)
    out = program.module()(x, torch.tensor([1, 2]))
    assert relative_error(out["gradient"], expected.gradient) <= 1e-5


def test_a_rule_that_cannot_be_pickled_is_named_at_save(tmp_path):
    class Local(gs.Rule):  # defined in a function: pickle cannot find it again
        name = "local"

        def backward(self, grad_output, output):
            return grad_output.clamp(min=0) * (output > 0)

    ex = gs.convert(make_model("resnet18"), layer="layer4", rule=Local())
    path = os.path.join(tmp_path, "local.gsx")
    with pytest.raises(gs.RuleError, match="Local.*cannot be saved.*top level"):
        ex.save(path)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


def test_an_ordinary_rule_swaps_nothing_and_needs_no_fork():
    class Ordinary(gs.Rule):
        name = "ordinary"
        ordinary = True

        def backward(self, grad_output, output):
            return grad_output * (output > 0)

    model = make_model("vgg11")
    ex = gs.convert(model, layer="features.18", rule=Ordinary())
    assert ex.swapped == () and not ex.forked and ex.report.ordinary_rule
    x = image_batch(32)
    x.requires_grad_(True)
    model(x)[:, 3].sum().backward()
    assert relative_error(ex.explain(x, 3).gradient, x.grad) <= 1e-6
