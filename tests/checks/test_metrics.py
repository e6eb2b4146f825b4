"""guided_swap.metrics against its peers: pytorch-grad-cam's ROAD and confidence-change metrics (same noise, same
softmax target), RISE's deletion/insertion loop and Quantus's PixelFlipping, on resnet18 and on a small DenseNet
with BatchNorm far from the identity (which neither peer tests), a grey-image CNN, a detector, 1D and 3D maps.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guided_swap as gs
from guided_swap.checks import metrics
from guided_swap.checks.metrics.baselines import blur_window
from conftest import MEAN, STD, image_batch, make_model, randomise_batchnorm, relative_error, small_densenet

TOLERANCE = 1e-4


def _models():
    return {"resnet18": (make_model("resnet18"), "layer4"), "densenet": (small_densenet(), "features")}


@pytest.fixture(scope="module", params=["resnet18", "densenet"])
def case(request):
    """(explainer, model, x, maps, classes): Grad-CAM at input size, min-max scaled, plus a faint ramp so no two
    positions tie (a ReLU'd CAM's flat zeros make ROAD undefined, for pytorch-grad-cam too)."""
    model, layer = _models()[request.param]
    x = image_batch(64, names=("chelsea", "astronaut", "coffee"))
    ex = gs.convert(model, layer=layer)
    e = ex.explain(x)
    cam = e.cam
    flat = cam.flatten(1)
    scaled = (flat - flat.min(1, keepdim=True).values) / (flat.max(1, keepdim=True).values -
                                                          flat.min(1, keepdim=True).values).clamp_min(1e-12)
    ramp = torch.linspace(0, 1e-3, flat.shape[1])
    maps = ((scaled * 0.99 + ramp) / 1.001).view_as(cam)
    assert float((cam != 0).float().mean()) > 0.2  # a real map, not mostly flat
    return ex, model, x, maps, e.target


def _pgc_targets(classes):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    return [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]


@pytest.mark.parametrize("order", ["morf", "lerf", "combined"])
def test_road_equals_pytorch_grad_cam(case, order):
    from pytorch_grad_cam.metrics.road import (ROADCombined, ROADLeastRelevantFirstAverage,
                                               ROADMostRelevantFirstAverage)

    ex, model, x, maps, classes = case
    percentiles = [20, 50, 80]
    peer = {"morf": ROADMostRelevantFirstAverage, "lerf": ROADLeastRelevantFirstAverage,
            "combined": ROADCombined}[order](percentiles)
    torch.manual_seed(3)
    expected = torch.from_numpy(peer(x, maps.numpy(), _pgc_targets(classes), model))
    torch.manual_seed(3)
    actual = metrics.road(ex, x, maps, classes, percentiles=percentiles, order=order)
    assert float(expected.abs().max()) > 0  # the perturbations moved the score
    assert relative_error(actual, expected) < TOLERANCE


def test_road_noise_from_a_generator_is_the_default_generators_numbers(case):
    ex, _, x, maps, classes = case
    torch.manual_seed(5)
    default = metrics.road(ex, x, maps, classes, percentiles=[30, 70], chunk=2)
    seeded = metrics.road(ex, x, maps, classes, percentiles=[30, 70], generator=torch.Generator().manual_seed(5))
    other = metrics.road(ex, x, maps, classes, percentiles=[30, 70], generator=torch.Generator().manual_seed(6))
    assert relative_error(seeded, default) < TOLERANCE  # chunk=2 against the default chunk: the same copies
    assert not torch.equal(other, default)


def test_confidence_change_and_its_drop_and_increase_equal_pytorch_grad_cam(case):
    from pytorch_grad_cam.metrics.cam_mult_image import (CamMultImageConfidenceChange, DropInConfidence,
                                                         IncreaseInConfidence)

    ex, model, x, maps, classes = case
    targets = _pgc_targets(classes)
    expected = torch.from_numpy(CamMultImageConfidenceChange()(x, maps.numpy(), targets, model))
    actual = metrics.confidence_change(ex, x, maps, classes)
    assert float(expected.abs().max()) > 0
    assert relative_error(actual, expected) < TOLERANCE
    drop = torch.from_numpy(DropInConfidence()(x, maps.numpy(), targets, model))
    assert relative_error(metrics.drop_in_confidence(ex, x, maps, classes), drop) < TOLERANCE
    increase = torch.from_numpy(IncreaseInConfidence()(x, maps.numpy(), targets, model))
    assert torch.equal(metrics.increase_in_confidence(ex, x, maps, classes), increase)


def rise_curve(model, image, saliency, klass, mode, step):
    """RISE's CausalMetric.single_run (Petsiuk et al. 2018), one image, as its code writes it: deletion from the
    image to zeros, insertion from RISE's blur to the image, ``step`` pixels at a time."""
    channels, height, width = image.shape[1:]
    window = torch.from_numpy(blur_window()).float()
    kernel = torch.zeros(channels, channels, 11, 11)
    for c in range(channels):
        kernel[c, c] = torch.outer(window, window)
    n = height * width
    n_steps = (n + step - 1) // step
    if mode == "deletion":
        start, finish = image.clone(), torch.zeros_like(image)
    else:
        start, finish = F.conv2d(image, kernel, padding=5), image.clone()
    order = torch.argsort(-saliency.reshape(-1), stable=True)
    scores = []
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores.append(float(model(start).softmax(1)[0, klass]))
        if i < n_steps:
            coords = order[step * i:step * (i + 1)]
            start.view(1, channels, -1)[0, :, coords] = finish.view(1, channels, -1)[0, :, coords]
    return torch.tensor(scores)


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_deletion_and_insertion_equal_rise(case, kind):
    ex, model, x, maps, classes = case
    steps = 8  # 64 x 64 positions: RISE's step of 512
    result = getattr(metrics, kind)(ex, x, maps, classes, steps=steps, chunk=7)
    expected = torch.stack([rise_curve(model, x[b:b + 1], maps[b], int(classes[b]), kind, 64 * 64 // steps)
                            for b in range(x.shape[0])])
    assert result.curve.shape == (3, steps + 1) and result.fractions[0] == 0 and result.fractions[-1] == 1
    assert float(expected.std()) > 0
    assert relative_error(result.curve, expected) < TOLERANCE
    area = (expected.sum(1) - expected[:, 0] / 2 - expected[:, -1] / 2) / steps  # RISE's auc
    assert relative_error(result.auc, area) < TOLERANCE
    assert (result.kind, result.steps, result.score) == (kind, steps, "softmax")


def test_deletion_equals_quantus_pixel_flipping(case):
    """Quantus flips features of the map broadcast over channels; with no two positions tied, each step of
    3 x 48 features is 48 whole positions, as one of our 48 steps on a 48 x 48 image."""
    quantus = pytest.importorskip("quantus")
    ex, model, _, _, _ = case
    x = image_batch(48, names=("chelsea", "coffee"))
    e = ex.explain(x)
    maps = e.cam + torch.linspace(0, 1e-3 * float(e.cam.max()), 48 * 48).view(48, 48)
    per_channel = np.ascontiguousarray(np.broadcast_to(maps.numpy()[:, None], x.shape))
    metric = quantus.PixelFlipping(features_in_step=3 * 48, perturb_baseline="black", normalise=False, abs=False,
                                   disable_warnings=True)
    expected = torch.tensor(metric(model=model, x_batch=x.numpy(), y_batch=e.target.numpy(), a_batch=per_channel,
                                   device="cpu", softmax=True, channel_first=True))
    black = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)  # Quantus's "black": each input's smallest value
    actual = metrics.deletion(ex, x, maps, e.target, steps=48, baseline=black)
    assert float(expected.std()) > 0
    assert relative_error(actual.curve[:, 1:], expected) < TOLERANCE


def test_baselines_are_what_they_say(case):
    ex, _, x, maps, classes = case
    mean = metrics.baseline(x, "mean")
    assert torch.allclose(mean[:, :, 0, 0], x.mean(dim=(2, 3)))
    blurred = metrics.baseline(x, "blur")
    kernel = torch.outer(torch.from_numpy(blur_window()), torch.from_numpy(blur_window())).float()
    expected = F.conv2d(x.reshape(-1, 1, 64, 64), kernel.view(1, 1, 11, 11), padding=5).view_as(x)
    assert relative_error(blurred, expected) < 1e-5
    zeros = metrics.deletion(ex, x, maps, classes, steps=4)
    with_mean = metrics.deletion(ex, x, maps, classes, steps=4, baseline="mean")
    assert torch.equal(zeros.curve[:, 0], with_mean.curve[:, 0]) and not torch.equal(zeros.curve, with_mean.curve)


# --- a model the peers do not test: grey images, one channel --------------------------------------------

def test_grey_images_equal_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.road import ROADCombined

    model, x, _ = gs.demo.load_demo()
    ex = gs.convert(model, layer="auto")
    e = ex.explain(x)
    maps = e.cam / e.cam.flatten(1).amax(1).view(-1, 1, 1) + torch.linspace(0, 1e-3, 48 * 48).view(48, 48)
    torch.manual_seed(1)
    expected = torch.from_numpy(ROADCombined([30, 60, 90])(x, maps.numpy(), _pgc_targets(e.target), model))
    torch.manual_seed(1)
    actual = metrics.road(ex, x, maps, e.target, percentiles=[30, 60, 90])
    assert relative_error(actual, expected) < TOLERANCE


def test_a_flat_map_is_nan_with_a_warning(case):
    """Where nothing is kept the system is singular: pytorch-grad-cam's spsolve then returns what rounding
    makes of it (a number); we say NaN, and why. The other samples still equal pytorch-grad-cam's."""
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirstAverage

    ex, model, x, maps, classes = case
    flat = maps.clone()
    flat[0] = torch.where(maps[0] < maps[0].median(), torch.zeros(()), maps[0])  # half its positions at 0
    torch.manual_seed(4)
    with pytest.warns(RuntimeWarning, match=r"sample\(s\) \[0\].*morf 20"):
        actual = metrics.road(ex, x, flat, classes, percentiles=[20, 80], order="morf")
    torch.manual_seed(4)
    with np.errstate(all="ignore"), pytest.warns(Warning):
        expected = ROADMostRelevantFirstAverage([20, 80])(x, flat.numpy(), _pgc_targets(classes), model)
    assert bool(torch.isnan(actual[0]))
    assert relative_error(actual[1:], torch.from_numpy(expected[1:])) < TOLERANCE


# --- a detector: gs.Box becomes a match of the clean detection -----------------------------------------

class TinyDetector(nn.Module):
    """A detector in torchvision's format (a list of images in, a dict per image out, most confident first) whose
    boxes and scores follow the image: a random torchvision detector barely looks at its input."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.scores = nn.Linear(8, 3)
        self.shifts = nn.Linear(8, 12)
        self.register_buffer("anchors", torch.tensor([[8., 8., 40., 40.], [20., 4., 60., 50.], [30., 30., 62., 62.]]))
        self.register_buffer("labels", torch.tensor([1, 2, 1]))

    def forward(self, images):
        out = []
        pooled = self.features(torch.stack(list(images))).mean(dim=(2, 3))
        for b in range(pooled.shape[0]):
            scores = torch.sigmoid(self.scores(pooled[b]))
            boxes = self.anchors + 6 * torch.tanh(self.shifts(pooled[b]).view(3, 4))
            order = torch.argsort(scores, descending=True)
            out.append({"boxes": boxes[order], "scores": scores[order], "labels": self.labels[order]})
        return out


def test_a_detector_box_target_equals_pytorch_grad_cam_box_score_target():
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    torch.manual_seed(0)
    detector = randomise_batchnorm(TinyDetector()).eval()
    x = (image_batch(64) * STD + MEAN).clamp(0, 1)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    ex = gs.convert(detector, layer="features.3")
    e = ex.explain(list(x), gs.Box(0))
    assert ex.report.capture.startswith("runtime")
    maps = (e.cam / e.cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1) +
            torch.linspace(0, 1e-3, 64 * 64).view(64, 64)) / 1.001  # in [0, 1], no two positions tied
    with torch.no_grad():
        found = detector(list(x))
    targets = [FasterRCNNBoxScoreTarget(d["labels"][:1], d["boxes"][:1]) for d in found]
    expected = torch.from_numpy(CamMultImageConfidenceChange()(x, maps.numpy(), targets, detector)).view(-1)
    actual = metrics.confidence_change(ex, list(x), maps, gs.Box(0))
    assert float(expected.abs().min()) > 1e-3
    assert relative_error(actual, expected) < TOLERANCE
    torch.manual_seed(2)
    expected = torch.from_numpy(ROADMostRelevantFirstAverage([30, 70])(x, maps.numpy(), targets, detector)).view(-1)
    torch.manual_seed(2)
    actual = metrics.road(ex, list(x), maps, gs.Box(0), percentiles=[30, 70], order="morf")
    assert float(expected.abs().min()) > 1e-4
    assert relative_error(actual, expected) < TOLERANCE
    curve = metrics.insertion(ex, list(x), maps, gs.Box(0), steps=4)
    clean = torch.stack([1 + d["scores"][0] for d in found])  # the clean detection matches itself: IoU 1 + score
    assert curve.score == "box" and relative_error(curve.curve[:, -1], clean) < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in detector.state_dict().items())


# --- 1D and 3D maps ------------------------------------------------------------------------------------

def dense_imputation(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The imputation's equations solved densely, position by position: for each removed i,
    (Σ_j w_ij) x_i - Σ_{j removed} w_ij x_j = Σ_{j kept} w_ij v_j, over in-bounds neighbours j."""
    spatial = tuple(keep.shape)
    weights = metrics.neighbour_weights(len(spatial))
    removed = [tuple(p) for p in np.argwhere(~keep.numpy())]
    where = {p: i for i, p in enumerate(removed)}
    a = np.zeros((len(removed), len(removed)))
    b = np.zeros((len(removed), image.shape[0]))
    for i, p in enumerate(removed):
        for offset, w in weights:
            q = tuple(np.add(p, offset))
            if all(0 <= v < s for v, s in zip(q, spatial)):
                a[i, i] += w
                if q in where:
                    a[i, where[q]] -= w
                else:
                    b[i] += w * image[(slice(None),) + q].double().numpy()
    out = image.clone()
    solution = torch.from_numpy(np.linalg.solve(a, b)).float()
    for i, p in enumerate(removed):
        out[(slice(None),) + p] = solution[i]
    return out


@pytest.mark.parametrize("spatial", [(40,), (6, 7, 8)])
def test_imputation_in_1d_and_3d_solves_its_equations(spatial):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((2,) + spatial, generator=generator)
    keep = torch.rand(spatial, generator=generator) > 0.6
    actual = metrics.impute(image[None], keep[None], noise=0.0)[0]
    assert relative_error(actual, dense_imputation(image, keep)) < 1e-5
    assert torch.equal(actual[:, keep], image[:, keep])


class Net1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Conv1d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=2))


class Net3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("net, shape", [(Net1D, (3, 2, 40)), (Net3D, (2, 1, 6, 7, 8))])
def test_every_metric_runs_on_1d_and_3d_maps_and_deletion_ends_at_the_baseline(net, shape):
    torch.manual_seed(0)
    model = randomise_batchnorm(net()).eval()
    ex = gs.convert(model, layer="conv")
    x = torch.randn(shape)
    e = ex.explain(x)
    maps = e.cam + torch.linspace(0, 1e-3, e.cam[0].numel()).view(e.cam.shape[1:])
    assert metrics.road(ex, x, maps, percentiles=[30, 70]).shape == (shape[0],)
    assert metrics.confidence_change(ex, x, metrics.unit_range(maps)).shape == (shape[0],)
    result = metrics.deletion(ex, x, maps, steps=5, baseline="blur")
    with torch.no_grad():
        probabilities = model(metrics.blur(x)).softmax(1).gather(1, e.target.view(-1, 1)).squeeze(1)
        clean = model(x).softmax(1).gather(1, e.target.view(-1, 1)).squeeze(1)
    assert relative_error(result.curve[:, -1], probabilities) < 1e-5
    assert relative_error(result.curve[:, 0], clean) < 1e-5


# --- errors and the user's model -------------------------------------------------------------------------

def test_errors_say_what_to_do(case):
    ex, _, x, maps, classes = case
    with pytest.raises(gs.InputError, match=r"amax\(dim=1\)"):
        metrics.deletion(ex, x, maps.unsqueeze(1).expand(-1, 3, -1, -1), classes)
    with pytest.raises(gs.InputError, match="cam_raw"):
        metrics.deletion(ex, x, maps[:, :8, :8], classes)
    with pytest.raises(ValueError, match="percentiles"):
        metrics.road(ex, x, maps, classes, percentiles=[0, 50])
    with pytest.raises(ValueError, match="order"):
        metrics.road(ex, x, maps, classes, order="both")
    with pytest.raises(ValueError, match="baseline"):
        metrics.insertion(ex, x, maps, classes, baseline="grey")
    with pytest.raises(ValueError, match="steps"):
        metrics.insertion(ex, x, maps, classes, steps=0)
    with pytest.raises(ValueError, match="score"):
        metrics.confidence_change(ex, x, maps, lambda out: out[:, 0], score="softmax")
    with pytest.raises(gs.TargetError, match="Channel"):
        metrics.confidence_change(ex, x, maps, gs.Channel(ex.layers[0], 0))


def test_logit_score_and_callable_targets_score_the_same_thing(case):
    ex, _, x, maps, classes = case
    by_logit = metrics.confidence_change(ex, x, maps, classes, score="logit")
    by_function = metrics.confidence_change(ex, x, maps, lambda out: out.gather(1, classes.view(-1, 1)).squeeze(1))
    assert relative_error(by_function, by_logit) < 1e-6


def test_metrics_leave_the_model_as_it_was(case):
    ex, model, x, maps, classes = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics.road(ex, x, maps, classes, percentiles=[50])
    metrics.insertion(ex, x, maps, classes, steps=2)
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# --- the user's dtypes and containers --------------------------------------------------------------------

def _small_net(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5))
    return randomise_batchnorm(model).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_every_metric_runs_on_a_model_of_another_dtype(dtype):
    """A float64 (or bfloat16) model gets its copies in its own dtype. pytorch-grad-cam's ROAD fails on float64
    (its imputer writes float32 into the image), so float64 ROAD is checked against the float32 model's."""
    model = _small_net(dtype)
    x = torch.randn(3, 3, 12, 12).to(dtype)
    ex = gs.convert(model, layer="2")
    maps = torch.rand(3, 12, 12)
    classes = torch.tensor([0, 3, 4])
    torch.manual_seed(7)
    actual = metrics.road(ex, x, maps, classes, percentiles=[30, 70], chunk=4)
    assert actual.shape == (3,) and bool(torch.isfinite(actual).all())
    if dtype == torch.float64:
        single = _small_net(torch.float32)
        torch.manual_seed(7)
        expected = metrics.road(single, x.float(), maps, classes, percentiles=[30, 70])
        assert float(expected.abs().max()) > 0 and relative_error(actual, expected) < TOLERANCE
    assert metrics.confidence_change(ex, x, maps, classes).shape == (3,)
    assert metrics.deletion(ex, x, maps, classes, steps=3, baseline="blur").curve.shape == (3, 4)



def test_numpy_numbers_and_arrays_are_taken_where_python_ones_are(case):
    ex, _, x, maps, classes = case
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = metrics.road(ex, x, maps, classes, percentiles=[30, 70], generator=generator(), chunk=4)
    for percentiles in (np.array([30, 70]), range(30, 71, 40), [np.float64(30), np.int64(70)], torch.tensor([30, 70])):
        actual = metrics.road(ex, x, maps, classes, percentiles=percentiles, generator=generator(), chunk=np.int64(4))
        assert torch.equal(actual, expected)
    curve = metrics.deletion(ex, x, maps, classes, steps=3, chunk=5)
    assert torch.equal(metrics.deletion(ex, x, maps, classes, steps=np.int64(3), chunk=np.int32(5)).curve, curve.curve)
    tensor_base = metrics.insertion(ex, x, maps, classes, steps=3, baseline=torch.zeros(3, 1, 1))
    numpy_base = metrics.insertion(ex, x, maps, classes, steps=3, baseline=np.zeros((3, 1, 1), dtype=np.float32))
    assert torch.equal(numpy_base.curve, tensor_base.curve)
    with pytest.raises(ValueError, match="percentiles"):
        metrics.road(ex, x, maps, classes, percentiles=np.array([[30, 70]]))
    with pytest.raises(ValueError, match="percentiles"):
        metrics.road(ex, x, maps, classes, percentiles=[float("nan")])
    with pytest.raises(ValueError, match="percentiles"):
        metrics.road(ex, x, maps, classes, percentiles=50)
    with pytest.raises(ValueError, match="chunk"):
        metrics.road(ex, x, maps, classes, chunk=2.5)
    with pytest.raises(TypeError, match="baseline"):
        metrics.insertion(ex, x, maps, classes, baseline=[0.0, 0.0, 0.0])


def test_numpy_targets_are_the_classes_they_hold(case):
    """A numpy array of classes, a numpy integer and a 0-d tensor were refused as targets ("not understood")."""
    ex, _, x, maps, classes = case
    expected = metrics.confidence_change(ex, x, maps, classes)
    assert torch.equal(metrics.confidence_change(ex, x, maps, classes.numpy()), expected)
    first = metrics.confidence_change(ex, x[:1], maps[:1], int(classes[0]))
    for same in (np.int64(classes[0]), classes[0].clone()):
        assert torch.equal(metrics.confidence_change(ex, x[:1], maps[:1], same), first)


def test_a_callable_target_of_the_wrong_shape_is_told_it_scores_chunks_of_copies(case):
    ex, _, x, maps, _ = case
    with pytest.raises(gs.TargetError, match=r"shape \(6,\); got \(3,\).*chunk of perturbed copies"):
        metrics.deletion(ex, x, maps, lambda out: torch.ones(x.shape[0]), steps=2)


def test_map_shape_errors_name_the_fix_for_each_near_miss(case):
    ex, _, x, maps, classes = case
    with pytest.raises(gs.InputError, match=r"maps\[:, 0\]"):  # a channel axis of one: drop it, no abs
        metrics.deletion(ex, x, maps[:, None], classes)
    with pytest.raises(gs.InputError, match=r"maps\[None\]"):  # one sample's map, without the batch axis
        metrics.road(ex, x[:1], maps[0], classes[:1])
    with pytest.raises(gs.InputError, match=r"one map per sample"):
        metrics.confidence_change(ex, x, maps[:2], classes)


def test_an_empty_batch_gives_empty_results(case):
    ex, _, x, maps, classes = case
    assert metrics.road(ex, x[:0], maps[:0], classes[:0], percentiles=[50]).shape == (0,)
    assert metrics.confidence_change(ex, x[:0], maps[:0], classes[:0]).shape == (0,)
    result = metrics.insertion(ex, x[:0], maps[:0], classes[:0], steps=4)
    assert result.curve.shape == (0, 5) and result.auc.shape == (0,) and result.fractions.shape == (5,)


def test_confidence_change_refuses_maps_outside_0_1_and_says_how_to_scale_them(case):
    """The map multiplies the input: a raw CAM (e.cam, not scaled) or a signed map would measure a rescaled or
    sign-flipped image, not the input kept where the map says."""
    ex, _, x, maps, classes = case
    with pytest.raises(gs.InputError, match=r"\[0, 1\].*amax"):
        metrics.confidence_change(ex, x, maps * 3, classes)
    with pytest.raises(gs.InputError, match=r"\[0, 1\]"):
        metrics.drop_in_confidence(ex, x, maps - 0.5, classes)
    edges = maps.clone()
    edges[:, 0, 0], edges[:, -1, -1] = 0.0, 1.0
    assert metrics.confidence_change(ex, x, edges, classes).shape == (3,)


def test_road_depends_only_on_the_order_so_tie_broken_maps_give_the_same_numbers(case):
    ex, _, x, _, classes = case
    maps = torch.randn(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(0))
    assert all(len(torch.unique(m)) == m.numel() for m in maps)  # no two positions tied
    for percentiles in ([10, 37.5, 90], [5, 50, 95]):
        raw = metrics.road(ex, x, maps, classes, percentiles=percentiles, generator=torch.Generator().manual_seed(1))
        ranked = metrics.road(ex, x, metrics.tie_broken(maps), classes, percentiles=percentiles,
                              generator=torch.Generator().manual_seed(1))
        assert torch.equal(raw, ranked)
    flat = torch.zeros(1, 2, 3)
    assert torch.equal(metrics.tie_broken(flat), torch.tensor([[[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]]]))
