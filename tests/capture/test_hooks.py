"""A model's own hooks: traced into the graph when they return a value, otherwise run by the run-time capture
(never silently skipped); hooks are read at convert; the user's hooks are left as they were."""
import os

import pytest
import torch
import torchvision
from torch import nn

import guided_swap as gs
from conftest import make_model


@pytest.fixture
def resnet():
    return make_model("resnet18").eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def _plain(model, x, layer="layer4"):
    """The maps of the same model without hooks (a fresh copy of its weights)."""
    clean = torchvision.models.resnet18()
    clean.load_state_dict(model.state_dict())
    return gs.convert(clean.eval(), layer=layer).explain(x, [3, 5])


def test_a_side_effect_hook_runs_at_every_explain_through_the_runtime_capture(resnet, x):
    seen = []
    handle = resnet.layer4.register_forward_hook(lambda m, i, o: seen.append(type(o)))
    ex = gs.convert(resnet, layer="layer4", example_input=x)
    assert ex.report.capture.startswith("runtime") and "hook" in ex.report.capture and "layer4" in ex.report.capture
    seen.clear()
    e = ex.explain(x, [3, 5])
    assert seen and all(t is torch.Tensor for t in seen)  # real tensors, at explain time
    plain = _plain(resnet, x)
    torch.testing.assert_close(e.gradient, plain.gradient)
    torch.testing.assert_close(e.cam, plain.cam)
    handle.remove()


@pytest.mark.parametrize("path", ["fx", "export"])
def test_graph_paths_refuse_hooks_they_would_skip_naming_them(resnet, x, path):
    def count_calls(module, inputs, output):
        return None

    resnet.layer3.register_forward_hook(count_calls)
    with pytest.raises(gs.TraceError, match=r"(?s)forward hook .*count_calls on module layer3.*capture='runtime'"):
        gs.convert(resnet, layer="layer4", capture=path, example_input=x)


def test_a_hook_that_changes_the_output_is_traced_and_honoured_exactly(resnet, x, tmp_path):
    resnet.layer3.register_forward_hook(lambda m, i, o: o * 0.5 + 0.1)
    resnet.layer2.register_forward_pre_hook(lambda m, args: (args[0].flip(-1),))
    ex = gs.convert(resnet, layer="layer4")
    assert ex.report.capture == "fx"
    with torch.no_grad():
        torch.testing.assert_close(ex(x), resnet(x))
    graph = ex.explain(x, [3, 5])
    runtime = gs.convert(resnet, layer="layer4", capture="runtime").explain(x, [3, 5])
    torch.testing.assert_close(graph.gradient, runtime.gradient)
    torch.testing.assert_close(graph.cam, runtime.cam)
    ex.save(str(tmp_path / "hooked.gsx"))  # the lambdas are in the graph, not in the file
    loaded = gs.load(str(tmp_path / "hooked.gsx"))
    torch.testing.assert_close(loaded.explain(x, [3, 5]).gradient, graph.gradient)


def test_a_hook_on_a_module_fx_keeps_whole_is_held_by_the_export_graph(resnet, x):
    resnet.layer4[1].conv2.register_forward_hook(lambda m, i, o: o * 2.0)
    with pytest.raises(gs.TraceError, match="layer4.1.conv2"):
        gs.convert(resnet, layer="layer4", capture="fx")
    ex = gs.convert(resnet, layer="layer4", example_input=x)
    assert ex.report.capture.startswith("export") and "hook" in ex.report.capture
    with torch.no_grad():
        torch.testing.assert_close(ex(x), resnet(x))
    runtime = gs.convert(resnet, layer="layer4", capture="runtime").explain(x, [3, 5])
    torch.testing.assert_close(ex.explain(x, [3, 5]).gradient, runtime.gradient)


def test_a_hook_on_a_relu_the_rule_replaces_and_a_backward_hook_still_run(resnet, x):
    relu_calls, grads = [], []
    resnet.layer1[0].relu.register_forward_hook(lambda m, i, o: relu_calls.append(1))
    resnet.layer4.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0].detach()))
    ex = gs.convert(resnet, layer="layer4")
    e = ex.explain(x, [3, 5])
    assert ex.report.capture.startswith("runtime")
    assert relu_calls and grads and grads[-1].shape == (2, 512, 2, 2)
    assert len(ex.swapped) > 0  # the ReLUs still carry the rule
    torch.testing.assert_close(e.gradient, _plain(resnet, x).gradient)


def test_a_global_module_hook_is_refused_on_graph_paths(resnet, x):
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(gs.TraceError, match="global forward hook"):
            gs.convert(resnet, layer="layer4", capture="fx")
    finally:
        handle.remove()


def test_hooks_are_read_at_convert_and_the_models_own_stay_as_they_were(resnet, x):
    def keep(module, inputs, output):
        return output

    resnet.layer4.register_forward_hook(keep)
    before = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in resnet.named_modules()}
    ex = gs.convert(resnet, layer="layer4")
    ex.explain(x, [3, 5])
    after = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in resnet.named_modules()}
    assert after == before  # the very same hook objects, nothing added or wrapped
    runtime = gs.convert(resnet, layer="layer4", capture="runtime")
    late = []
    resnet.layer3.register_forward_hook(lambda m, i, o: late.append(1))
    ex.explain(x, [3, 5])
    runtime.explain(x, [3, 5])
    assert late == []  # a hook added after convert reaches neither explainer's copy


def test_saving_a_runtime_explainer_with_a_lambda_hook_names_the_hook_and_writes_nothing(resnet, x, tmp_path):
    resnet.layer4.register_forward_hook(lambda m, i, o: None)
    ex = gs.convert(resnet, layer="layer4", example_input=x)
    path = tmp_path / "r.gsx"
    with pytest.raises(TypeError, match=r"forward hook .*<lambda> on module layer4.*nothing was written"):
        ex.save(str(path))
    assert not path.exists() and os.listdir(tmp_path) == []


def test_hooks_registered_with_kwargs_are_sorted_like_the_others(resnet, x):
    seen = []
    handle = resnet.layer4.register_forward_hook(lambda m, args, kwargs, o: seen.append(type(o)), with_kwargs=True)
    ex = gs.convert(resnet, layer="layer4", example_input=x)
    assert ex.report.capture.startswith("runtime") and "layer4" in ex.report.capture
    seen.clear()
    ex.explain(x, [3, 5])
    assert seen == [torch.Tensor]
    handle.remove()
    resnet.layer3.register_forward_hook(lambda m, args, kwargs, o: o * 0.5, with_kwargs=True)
    resnet.layer2.register_forward_pre_hook(lambda m, args, kwargs: ((args[0].flip(-1),), kwargs), with_kwargs=True)
    resnet.layer1.register_forward_hook(lambda m, args, o: o + 0.1, always_call=True)
    ex = gs.convert(resnet, layer="layer4")
    assert ex.report.capture == "fx"
    with torch.no_grad():
        torch.testing.assert_close(ex(x), resnet(x))
    runtime = gs.convert(resnet, layer="layer4", capture="runtime").explain(x, [3, 5])
    torch.testing.assert_close(ex.explain(x, [3, 5]).gradient, runtime.gradient)


def test_a_global_module_hook_runs_at_every_explain(resnet, x):
    modules = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: modules.append(type(m).__name__))
    try:
        ex = gs.convert(resnet, layer="layer4", example_input=x)
        assert ex.report.capture.startswith("runtime") and "global forward hook" in ex.report.capture
        modules.clear()
        ex.explain(x, [3, 5])
    finally:
        handle.remove()
    assert {"Conv2d", "BatchNorm2d", "BasicBlock", "Linear"} <= set(modules)


def test_hooks_on_a_timm_model(x):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False).eval()
    seen = []
    model.layer3.register_forward_hook(lambda m, i, o: seen.append(type(o)))
    ex = gs.convert(model, layer="layer4", example_input=x)
    assert ex.report.capture.startswith("runtime")
    seen.clear()
    ex.explain(x, [3, 5])
    assert seen == [torch.Tensor]
    model = timm.create_model("resnet18", pretrained=False).eval()
    model.layer3.register_forward_hook(lambda m, i, o: o * 0.5)
    ex = gs.convert(model, layer="layer4")
    assert ex.report.capture == "fx"
    with torch.no_grad():
        torch.testing.assert_close(ex(x), model(x))
