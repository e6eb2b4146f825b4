"""Shared fixtures: seeded torchvision models with non-trivial BatchNorm statistics, real images."""
import functools

import numpy as np
import pytest
import torch
import torchvision
from skimage import data, transform

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def randomise_batchnorm(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every BatchNorm running stats and affine parameters that are far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.25)
                    module.bias.copy_((torch.rand(shape, generator=generator) - 0.5) * 0.2)
    return model


def make_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", True)
        kwargs.setdefault("aux_logits", False)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomise_batchnorm(model).eval()


def small_densenet(seed: int = 0) -> torch.nn.Module:
    """torchvision's DenseNet code (functional ReLUs, concatenations, in-place ReLU modules) at a small size:
    what densenet121 exercises, in a fraction of the time."""
    torch.manual_seed(seed)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16)
    return randomise_batchnorm(model).eval()


@functools.lru_cache(maxsize=None)
def _rgb(name: str) -> np.ndarray:
    image = getattr(data, name)()
    return image if image.ndim == 3 else np.stack([image] * 3, axis=-1)


def image_batch(size: int = 64, names=("chelsea", "astronaut")) -> torch.Tensor:
    """Real photographs from scikit-image, resized and ImageNet-normalised: (len(names), 3, size, size)."""
    tensors = []
    for name in names:
        resized = transform.resize(_rgb(name)[..., :3], (size, size), anti_aliasing=True)
        tensors.append((torch.from_numpy(resized).permute(2, 0, 1).float() - MEAN) / STD)
    return torch.stack(tensors)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (with a floor, for maps that are zero)."""
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual.detach() - expected.detach()).abs().max() / scale.detach())


@pytest.fixture(scope="session")
def images():
    return image_batch(64)


def assert_nontrivial(t: torch.Tensor, min_fraction: float = 0.05) -> None:
    """A map that is (nearly) all zeros would make every comparison pass; refuse it."""
    fraction = float((t != 0).float().mean())
    assert fraction >= min_fraction, f"only {fraction:.1%} of the map is non-zero: the comparison would be vacuous"


def lively_targets(model, x: torch.Tensor, layer: torch.nn.Module, candidates: int = 8) -> torch.Tensor:
    """Per sample, the highest-scoring class (of the top ``candidates``) whose reference Grad-CAM is not empty.

    With random weights many classes give an all-zero Grad-CAM; comparing zeros proves nothing.
    """
    from guided_swap.checks import reference

    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)[:, :candidates]
    chosen = ranked[:, 0].clone()
    for sample in range(x.shape[0]):
        for cls in ranked[sample]:
            cam = reference.gradcam(model, x[sample:sample + 1], [int(cls)], layer)
            if float((cam != 0).float().mean()) >= 0.25:
                chosen[sample] = cls
                break
    return chosen


def _signed_projection(original):
    """pytorch-grad-cam's get_2d_projection, then guided_swap's documented sign: the projection correlates
    positively with the centred channel sum of the weighted activations (an SVD's sign is arbitrary)."""
    def projection(weighted):
        out = original(weighted)
        evidence = np.nan_to_num(weighted).sum(axis=1).reshape(len(out), -1)
        evidence = evidence - evidence.mean(axis=1, keepdims=True)
        signs = np.where((out.reshape(len(out), -1) * evidence).sum(axis=1) >= 0, 1.0, -1.0).astype(np.float32)
        return out * signs.reshape(-1, *([1] * (out.ndim - 1)))
    return projection


@pytest.fixture
def signed_eigen(monkeypatch):
    """pytorch-grad-cam's eigen_smooth with guided_swap's sign rule applied to its own projection."""
    from pytorch_grad_cam import base_cam, grad_cam_elementwise, hirescam, layer_cam

    for module in (base_cam, layer_cam, hirescam, grad_cam_elementwise):
        monkeypatch.setattr(module, "get_2d_projection", _signed_projection(module.get_2d_projection))


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """pytorch-grad-cam and Captum keep views of hooked activations: an in-place rectifier after a layer would
    overwrite them. Their references run on a copy whose rectifier modules are out of place (the same maths)."""
    import copy

    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, (torch.nn.ReLU, torch.nn.ReLU6)):
            module.inplace = False
    return reference
