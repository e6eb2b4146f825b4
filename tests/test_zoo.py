"""All 80 torchvision classification models: convert, identical logits, one swap per ReLU call, maps that run."""
import pytest
import torch
import torchvision

import guided_swap as gs
from guided_swap.reference import ReLURule

from conftest import image_batch, make_model

MODELS = torchvision.models.list_models(module=torchvision.models)
GIANTS = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "convnext_large", "efficientnet_v2_l"}
# The large ViTs run the same code as vit_b_16 (tested at 224); built for a smaller image they cost a fifth
GIANT_IMAGE_SIZES = {"vit_h_14": 112, "vit_l_16": 112, "vit_l_32": 96}


def input_size(name: str) -> int:
    if name in GIANT_IMAGE_SIZES:
        return GIANT_IMAGE_SIZES[name]
    if name.startswith(("vit_", "maxvit")):
        return 224  # fixed patch grids
    return 96 if name == "inception_v3" else 64


def test_the_zoo_is_the_80_models():
    assert len(MODELS) == 80


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in GIANTS else n for n in MODELS])
def test_zoo_model(name):
    model = make_model(name, **({"image_size": GIANT_IMAGE_SIZES[name]} if name in GIANT_IMAGE_SIZES else {}))
    x = image_batch(input_size(name), ("chelsea",) if name in GIANTS else ("chelsea", "astronaut"))
    counter = ReLURule()  # counts ReLU calls at run time, without fx
    with torch.no_grad(), counter:
        expected = model(x)
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    assert len(ex.swapped) == counter.calls
    e = ex.explain(x)
    assert torch.equal(e.logits, expected)
    assert torch.equal(e.target, expected.argmax(dim=1))
    assert e.gradient.shape == x.shape and bool(torch.isfinite(e.gradient).all())
    assert e.cam.shape == (x.shape[0],) + x.shape[2:] and bool(torch.isfinite(e.cam).all())
