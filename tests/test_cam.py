"""The CAM maths as pure functions, checked against hand computations."""
import pytest
import torch

from guided_swap import cam


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
