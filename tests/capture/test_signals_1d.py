"""1-D signals (an ECG-style Conv1d net) end to end: convert, explain, every CAM, smoothing, against hooks."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_swap as gs

from conftest import assert_nontrivial, randomise_batchnorm, relative_error


class SignalNet(nn.Module):
    """Three Conv1d blocks, then an MLP head: ReLUs after the captured conv, so Grad-CAM needs the plain fork."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 7, padding=3), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def signals(batch: int = 3, length: int = 256) -> torch.Tensor:
    """Heartbeat-like traces: a slow wave, sharp periodic spikes and a little noise."""
    generator = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 4 * math.pi, length)
    rows = []
    for i in range(batch):
        beat = torch.sin(t * (1 + 0.2 * i)) * 0.3 + torch.exp(-((t % (math.pi * (0.8 + 0.1 * i))) - 0.3) ** 2 / 0.01)
        rows.append(beat + 0.05 * torch.randn(length, generator=generator))
    return torch.stack(rows).unsqueeze(1)


def hooked_two_pass(model, x, target, layer):
    """Grad-CAM from a forward hook and ordinary gradients, then guided backprop from ReLU backward hooks (every
    ReLU here is its own nn.ReLU module, used once, so hooks see them all): two passes, no fx."""
    kept = {}

    def keep(_, __, output):
        output.retain_grad()
        kept["A"] = output

    handle = layer.register_forward_hook(keep)
    model(x).gather(1, target.view(-1, 1)).sum().backward()
    handle.remove()
    A, G = kept["A"].detach(), kept["A"].grad
    cam = torch.relu((G.mean(dim=2, keepdim=True) * A).sum(dim=1))
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_full_backward_hook(lambda _, grad_in, __: (grad_in[0].clamp(min=0),)) for m in relus]
    leaf = x.clone().requires_grad_(True)
    model(leaf).gather(1, target.view(-1, 1)).sum().backward()
    for h in handles:
        h.remove()
    return cam, leaf.grad


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = randomise_batchnorm(SignalNet()).eval()
    x = signals()
    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)
    target = ranked[:, 0].clone()
    for i in range(x.shape[0]):  # a class whose reference Grad-CAM is not empty (random weights)
        for cls in ranked[i]:
            cam, _ = hooked_two_pass(model, x[i:i + 1], cls.view(1), model.features[8])
            if float((cam != 0).float().mean()) >= 0.25:
                target[i] = cls
                break
    return model, x, target


def test_gradcam_and_guided_backprop_equal_two_hooked_passes(net):
    model, x, target = net
    ex = gs.convert(model, layer="features.8")
    e = ex.explain(x, target)
    assert ex.report.forked and ex.report.layouts["features.8"].kind == "nchw"
    cam, guided = hooked_two_pass(model, x, target, model.features[8])
    assert_nontrivial(cam, 0.25)
    assert_nontrivial(guided)
    assert e.cam_raw.shape == (3, 64) and e.cam.shape == (3, 256) and e.guided_gradcam.shape == (3, 1, 256)
    assert relative_error(e.cam_raw, cam) < 1e-5
    assert relative_error(e.gradient, guided) < 1e-5
    heat = F.interpolate(cam.unsqueeze(1), size=256, mode="linear", align_corners=False).squeeze(1)
    assert relative_error(e.cam, heat) < 1e-5
    assert relative_error(e.guided_gradcam, heat.unsqueeze(1) * guided) < 1e-5


def test_auto_every_cam_and_smoothing_in_1d(net):
    model, x, target = net
    ex = gs.convert(model)  # auto: the last map with the last convolution's length
    e = ex.explain(x, target)
    assert ex.report.layers["auto"] == "features.9"
    for name in gs.cam_methods():
        assert e.cams_raw[name].shape == (3, 64) and e.cams[name].shape == (3, 256)
    assert_nontrivial(e.cams_raw["gradcam"], 0.25)
    smoothed = ex.explain(x, target, smooth=3, noise=0.1, generator=torch.Generator().manual_seed(0))
    assert smoothed.cams["eigengradcam"].shape == (3, 256) and smoothed.gradient.shape == x.shape
