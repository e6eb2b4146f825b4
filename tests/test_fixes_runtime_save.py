"""Saving a run-time explainer: it holds its copy of the model, so it saves and loads where the model's classes
are importable, is refused with a clear error where they are not, and a load that misses them says so."""
import os
import sys
import types

import pytest
import torch
from torch import nn

import guided_swap as gs
from guided_swap.runtime_explainer import convert_runtime
from models import EverySpelling


def test_a_runtime_explainer_saves_and_loads_with_its_model_classes(tmp_path):
    torch.manual_seed(0)
    ex = convert_runtime(EverySpelling().eval(), layer="conv2")
    x = torch.randn(2, 3, 16, 16)
    path = str(tmp_path / "r.gsx")
    ex.save(path)
    loaded = gs.load(path)
    assert loaded.report.capture == "runtime"
    assert torch.equal(loaded.explain(x, [0, 1]).gradient, ex.explain(x, [0, 1]).gradient)


def test_a_model_class_defined_in_a_function_is_refused_before_writing(tmp_path):
    class LocalNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x)).mean(dim=(2, 3))

    ex = convert_runtime(LocalNet().eval(), layer="conv")
    with pytest.raises(TypeError, match=r"captured at run time .*LocalNet.* cannot be imported by name"):
        ex.save(str(tmp_path / "r.gsx"))
    assert os.listdir(tmp_path) == []


def test_loading_without_the_model_class_says_what_is_missing(tmp_path, monkeypatch):
    module = types.ModuleType("gs_fixes_vanishing_models")
    exec("from torch import nn\n"
         "class VanishingNet(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.conv = nn.Conv2d(3, 2, 3)\n"
         "    def forward(self, x):\n"
         "        return self.conv(x).relu().mean(dim=(2, 3))\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = str(tmp_path / "r.gsx")
    convert_runtime(module.VanishingNet().eval(), layer="conv").save(path)
    monkeypatch.delitem(sys.modules, module.__name__)
    with pytest.raises(gs.LoadError, match="captured at run time the model's own classes"):
        gs.load(path)
