"""One explainer under load: threads, many calls, no state left behind."""
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

import guided_swap as gs
from guided_swap.checks import demo

from conftest import image_batch, make_model


def test_four_threads_give_exactly_the_serial_results():
    model = make_model("resnet18")
    ex = gs.convert(model, layer="layer4")
    inputs = [image_batch(48, (name,)) for name in ("chelsea", "astronaut", "immunohistochemistry", "camera")] * 3
    targets = [i % 7 for i in range(len(inputs))]
    serial = [ex.explain(x, [t]) for x, t in zip(inputs, targets)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda pair: ex.explain(*pair), [(x, [t]) for x, t in zip(inputs, targets)]))
    for a, b in zip(serial, parallel):
        assert torch.equal(a.gradient, b.gradient) and torch.equal(a.cam_raw, b.cam_raw)
        assert torch.equal(a.logits, b.logits)


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def test_many_explains_hold_no_memory_and_no_state():
    model, x, _ = demo.load_demo()
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    attributes = dict(vars(ex))
    for _ in range(50):
        ex.explain(x[:1])
    gc.collect()
    before = _rss_mib()
    for i in range(300):
        e = ex.explain(x[i % 8:i % 8 + 1])
        assert not e.gradient.requires_grad and e.gradient.grad_fn is None
    gc.collect()
    assert _rss_mib() - before < 10, "RSS grew while explaining"
    assert vars(ex).keys() == attributes.keys()
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in ex.parameters())


def test_an_explanation_keeps_nothing_alive_once_dropped():
    """The deterministic half of the check above: no explanation, input or autograd graph outlives its use."""
    model, x, _ = demo.load_demo()
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    image = x[:2].clone()
    e = ex.explain(image)
    watched = [weakref.ref(t) for t in (image, e.gradient, e.cam, e.cam_raw, e.logits)]
    del image, e
    gc.collect()
    assert all(ref() is None for ref in watched)


def test_infinite_inputs_are_refused():
    model, x, _ = demo.load_demo()
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    bad = x[:1].clone()
    bad[0, 0, 0, 0] = float("inf")
    try:
        ex.explain(bad)
    except gs.InputError as error:
        assert "Inf" in str(error)
    else:
        raise AssertionError("an infinite input was explained")
