"""The CAM maths as pure functions, checked against hand computations."""
import pytest
import torch

from guided_swap.core import cam


def test_gradcam_weights_are_spatial_means_of_the_gradient():
    torch.manual_seed(0)
    A, G = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    expected = torch.relu(torch.einsum("bk,bkhw->bhw", G.mean(dim=(2, 3)), A))
    assert torch.allclose(cam.gradcam(A, G), expected, atol=1e-6)


def test_pixelwise_and_guided_pixelwise():
    A = torch.tensor([[[[1.0]], [[2.0]]]])
    G = torch.tensor([[[[3.0]], [[-1.0]]]])
    assert cam.pixelwise_cam(A, G).item() == 1.0  # relu(3*1 - 1*2)
    assert cam.guided_pixelwise_cam(A, G).item() == 3.0  # relu(3*1 + 0*2)
    assert cam.pixelwise_cam(A, -G).item() == 0.0


def test_upsample_and_guided_gradcam_shapes():
    low = torch.rand(2, 3, 3)
    up = cam.upsample(low, (12, 12))
    assert up.shape == (2, 12, 12)
    assert torch.allclose(cam.upsample(low, (3, 3)), low)
    nearest = cam.upsample(low, (6, 6), mode="nearest")
    assert torch.equal(nearest[:, ::2, ::2], low)
    gradient = torch.randn(2, 3, 12, 12)
    assert torch.equal(cam.guided_gradcam(up, gradient), up[:, None] * gradient)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="feature map"):
        cam.gradcam(torch.rand(2, 5), torch.rand(2, 5))
    with pytest.raises(ValueError, match="differ in shape"):
        cam.gradcam(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 4))
    with pytest.raises(ValueError, match="interpolation"):
        cam.upsample(torch.rand(1, 2, 2), (4, 4), mode="cubic")
    with pytest.raises(ValueError, match="does not fit"):
        cam.guided_gradcam(torch.rand(1, 4, 4), torch.rand(1, 3, 5, 5))


@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 4)])
def test_maps_reduce_over_every_spatial_dimension(spatial):
    torch.manual_seed(0)
    A, G = torch.randn(2, 5, *spatial), torch.randn(2, 5, *spatial)
    flat = cam.gradcam(A.flatten(2), G.flatten(2))  # the same maths on (B, K, n): the rank must not matter
    assert cam.gradcam(A, G).shape == (2,) + spatial
    assert torch.allclose(cam.gradcam(A, G).flatten(1), flat, atol=1e-6)
    assert torch.allclose(cam.pixelwise_cam(A, G).flatten(1), cam.pixelwise_cam(A.flatten(2), G.flatten(2)))
    assert torch.allclose(cam.guided_pixelwise_cam(A, G).flatten(1),
                          cam.guided_pixelwise_cam(A.flatten(2), G.flatten(2)))


@pytest.mark.parametrize("spatial,torch_mode", [((3,), "linear"), ((3, 3), "bilinear"), ((2, 3, 3), "trilinear")])
def test_upsample_is_linear_for_each_rank_and_nearest_for_all(spatial, torch_mode):
    low = torch.rand((2,) + spatial)
    size = tuple(4 * s for s in spatial)
    expected = torch.nn.functional.interpolate(low[:, None], size=size, mode=torch_mode, align_corners=False)[:, 0]
    for name in ("linear", "bilinear", "trilinear"):
        assert torch.equal(cam.upsample(low, size, name), expected)
    nearest = cam.upsample(low, size, "nearest")
    assert torch.equal(nearest[(slice(None),) + (slice(None, None, 4),) * len(spatial)], low)
    gradient = torch.randn((2, 3) + size)
    assert torch.equal(cam.guided_gradcam(expected, gradient), expected[:, None] * gradient)


def test_upsample_refuses_a_mode_or_size_that_does_not_fit_the_rank():
    with pytest.raises(ValueError, match="does not work on a 3-d map"):
        cam.upsample(torch.rand(1, 2, 2, 2), (4, 4, 4), mode="bicubic")
    with pytest.raises(ValueError, match="matching size"):
        cam.upsample(torch.rand(1, 2, 2, 2), (4, 4))
