"""A gradient that is zero everywhere for a sample makes maps that show nothing: explain says so."""
import warnings

import pytest
import torch
from torch import nn

import guided_swap as gs
from guided_swap import convert_runtime


def small_cnn(zero_head: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    if zero_head:  # as torchvision's ViT starts its head
        nn.init.zeros_(model[5].weight)
    return model


class Silent(gs.Rule):
    """A rule that passes no gradient back: the input gradient is zero, the capture's gradient is not."""

    name = "test-silent"

    def backward(self, grad_output, output):
        return torch.zeros_like(grad_output)


def explain_warnings(explainer, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explainer.explain(*args, **kwargs)
    return [str(w.message) for w in caught]


def test_an_untrained_head_is_named_with_the_samples_and_what_is_zero():
    x = torch.randn(2, 3, 16, 16)
    for explainer in (gs.convert(small_cnn(zero_head=True), layer="2"),
                      convert_runtime(small_cnn(zero_head=True), layer="2")):
        messages = explain_warnings(explainer, x)
        assert len(messages) == 1, messages
        assert messages[0].startswith("the ordinary gradient at layer '2' is zero everywhere for sample(s) 0, 1, so "
                                      "every CAM there is zero")
        assert "zero-initialised head" in messages[0]


def test_only_the_samples_with_no_gradient_are_named():
    score = lambda out: out[:, 0] * torch.tensor([1.0, 0.0, 1.0])  # sample 1's score is a constant
    messages = explain_warnings(gs.convert(small_cnn(), layer="2"), torch.randn(3, 3, 16, 16), score)
    assert len(messages) == 1 and "for sample(s) 1, so" in messages[0]


def test_a_rule_that_passes_nothing_back_is_named_apart_from_the_cams():
    messages = explain_warnings(gs.convert(small_cnn(), layer="2", rule=Silent()), torch.randn(2, 3, 16, 16))
    assert messages == ["the 'test-silent' gradient is zero everywhere for sample(s) 0, 1, so e.gradient and "
                        "Guided Grad-CAM are zero there: no gradient reaches the input under this rule"]


def test_nothing_is_said_of_live_maps_of_channel_targets_or_when_values_are_not_read():
    x = torch.randn(2, 3, 16, 16)
    explainer = gs.convert(small_cnn(), layer=["0", "2"])
    assert explain_warnings(explainer, x) == []
    # a channel of layer 0: layer 2, after it, gets no gradient by design
    assert explain_warnings(explainer, x, gs.Channel("0", 3)) == []
    assert explain_warnings(gs.convert(small_cnn(zero_head=True), layer="2"), x, check_finite=False) == []


def test_the_maps_are_what_the_warning_says():
    e = gs.convert(small_cnn(zero_head=True), layer="2").explain(torch.randn(2, 3, 16, 16), check_finite=False)
    assert not e.cam.any() and not e.gradient.any() and not e.guided_gradcam.any()
