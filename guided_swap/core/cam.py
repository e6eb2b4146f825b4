"""Class activation maps as pure functions of the activation ``A`` (B, K, *spatial) and its gradient ``G``.

All of them take ordinary gradients (docs/methods.md); none needs a model. The spatial part may have any rank:
(l) for a Conv1d signal, (h, w) for an image, (d, h, w) or (t, h, w) for a volume or a video. The maths run in
float32 at least (:func:`working`): a float16 or bfloat16 model's maps are float32.

>>> import torch
>>> A = torch.ones(1, 2, 2, 2); G = torch.tensor([1.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
>>> gradcam(A, G)
tensor([[[0., 0.],
         [0., 0.]]])
>>> pixelwise_cam(A, -G)
tensor([[[2., 2.],
         [2., 2.]]])
>>> upsample(torch.ones(1, 2, 2, 2), (4, 8, 8)).shape   # a (B, t, h, w) map, trilinear
torch.Size([1, 4, 8, 8])
"""
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import GuidedSwapError

# "linear", "bilinear" and "trilinear" all mean linear interpolation along every spatial axis of the map.
LINEAR = ("linear", "bilinear", "trilinear")
INTERPOLATIONS_BY_RANK = {
    1: LINEAR + ("nearest", "nearest-exact", "area"),
    2: LINEAR + ("nearest", "nearest-exact", "bicubic", "area"),
    3: LINEAR + ("nearest", "nearest-exact", "area"),
}
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "linear", "trilinear", "nearest-exact")
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _check(activation: Tensor, gradient: Tensor) -> None:
    if activation.shape != gradient.shape:
        raise ValueError(f"activation {tuple(activation.shape)} and gradient {tuple(gradient.shape)} differ in shape")
    if activation.dim() < 3:
        raise ValueError(
            f"a class activation map needs a feature map (B, K, *spatial); got shape {tuple(activation.shape)}. "
            "Capture a convolutional layer (see guided_swap.layer_names(model))"
        )


def _spatial_dims(tensor: Tensor) -> tuple:
    return tuple(range(2, tensor.dim()))


def working(tensor: Tensor) -> Tensor:
    """``tensor`` in the dtype the CAM maths run in: float32 for a floating dtype narrower than float32
    (float16, bfloat16), else its own dtype. In float16 Grad-CAM++'s ``G²``, ``G³`` underflow and XGrad-CAM's sums
    over the positions overflow (maps all zero or NaN); in bfloat16 every sum keeps 8 significant bits.

    >>> working(torch.ones(2, dtype=torch.float16)).dtype, working(torch.ones(2, dtype=torch.float64)).dtype
    (torch.float32, torch.float64)
    """
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < 32:
        return tensor.float()
    return tensor


def _inputs(activation: Tensor, gradient: Tensor) -> Tuple[Tensor, Tensor]:
    """``(A, G)`` checked and in the working dtype (:func:`working`)."""
    _check(activation, gradient)
    return working(activation), working(gradient)


def gradcam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM: ``ReLU(sum_k mean_spatial(G_k) * A_k)``, shape (B, *spatial)."""
    return torch.relu(gradcam_weighted(activation, gradient).sum(dim=1))


def pixelwise_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Pixel-wise CAM: ``ReLU(sum_k G_k * A_k)``, shape (B, *spatial)."""
    return torch.relu(hirescam_weighted(activation, gradient).sum(dim=1))


def guided_pixelwise_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Guided pixel-wise CAM: ``ReLU(sum_k ReLU(G_k) * A_k)``, shape (B, *spatial)."""
    return torch.relu(layercam_weighted(activation, gradient).sum(dim=1))


def upsample(cam: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize a (B, *spatial) map to (B, *size): linear, bilinear or trilinear by the map's rank for the
    linear modes (any of the three names), or ``nearest``, ``area`` (``bicubic`` for 2-d maps only)."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation {mode!r} is not one of {INTERPOLATIONS}")
    rank = cam.dim() - 1
    if rank not in INTERPOLATIONS_BY_RANK or len(tuple(size)) != rank:
        raise ValueError(f"expected a (B, *spatial) map with 1 to 3 spatial dimensions matching size {tuple(size)}, "
                         f"got shape {tuple(cam.shape)}")
    if mode not in INTERPOLATIONS_BY_RANK[rank]:
        raise ValueError(f"interpolation {mode!r} does not work on a {rank}-d map; use one of "
                         f"{INTERPOLATIONS_BY_RANK[rank]}")
    mode = _LINEAR_MODE[rank] if mode in LINEAR else mode
    extra = {"align_corners": False} if mode in LINEAR + ("bicubic",) else {}
    return F.interpolate(cam.unsqueeze(1), size=tuple(size), mode=mode, **extra).squeeze(1)


def guided_gradcam(cam: Tensor, guided_gradient: Tensor) -> Tensor:
    """Guided Grad-CAM: the upsampled (B, *S) map times the guided-backprop map (B, C, *S), per channel."""
    if cam.shape[0] != guided_gradient.shape[0] or cam.shape[1:] != guided_gradient.shape[2:]:
        raise ValueError(f"cam {tuple(cam.shape)} does not fit gradient {tuple(guided_gradient.shape)}")
    return cam.unsqueeze(1) * guided_gradient


# --- more gradient CAMs from the same A and G -------------------------------------------------------------
# Each follows its paper and pytorch-grad-cam's code (the tests compare them), ReLU applied, any spatial rank.

#: Added to Grad-CAM++'s denominator, as pytorch-grad-cam does (it matters only where G² is ~1e-6 or smaller).
PLUSPLUS_EPS = 1e-6
#: Added to XGrad-CAM's per-channel activation sums, as pytorch-grad-cam does.
XGRADCAM_EPS = 1e-7


def gradcam_plusplus(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential score): ``ReLU(sum_k w_k A_k)`` with
    ``w_k = sum_p alpha_kp ReLU(G_kp)``, ``alpha = G² / (2 G² + sum_p(A_k) G³ + eps)``, 0 where ``G = 0``."""
    return torch.relu(gradcam_plusplus_weighted(activation, gradient).sum(dim=1))


def xgradcam(activation: Tensor, gradient: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): ``w_k = sum_p G_kp A_kp / (sum_p A_kp + eps)``; ``ReLU(sum_k w_k A_k)``."""
    return torch.relu(xgradcam_weighted(activation, gradient).sum(dim=1))


def elementwise_gradcam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): ``ReLU(sum_k ReLU(G_k * A_k))``."""
    return torch.relu(elementwise_weighted(activation, gradient).sum(dim=1))


def eigengradcam(activation: Tensor, gradient: Tensor) -> Tensor:
    """EigenGrad-CAM: the first principal component of ``G * A`` over the positions, ReLU applied.

    Per sample, the (positions x channels) matrix ``G * A`` is centred over the positions and projected on its
    first right singular vector ``v``, as pytorch-grad-cam does. An SVD leaves the sign of ``v`` arbitrary; here
    it is fixed per sample so that ``sum_k v_k >= 0``, which is the same as saying that the map correlates
    positively with the (centred) evidence ``sum_k G_k A_k`` for the target at each position. Two equal top
    singular values leave the component itself ambiguous (a map with a single position gives zeros).
    """
    return torch.relu(principal_component(hirescam_weighted(activation, gradient)))


def principal_component(weighted: Tensor) -> Tensor:
    """The first principal component over the positions of a (B, K, *spatial) tensor, one (B, *spatial) map.

    Per sample the (positions x K) matrix is centred over the positions and projected on its first right singular
    vector ``v``, signed so that ``sum_k v_k >= 0``: the map then correlates positively with the centred channel sum
    ``sum_k weighted_k`` (pytorch-grad-cam's ``get_2d_projection``, whose sign is arbitrary, with that rule).

    >>> w = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]])   # (1, 2 channels, 3 positions), rank one
    >>> principal_component(w)
    tensor([[-2.2361,  0.0000,  2.2361]])
    """
    product = working(weighted).flatten(2).transpose(1, 2)              # (B, positions, K)
    centred = product - product.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    first = vh[:, 0, :]                                                  # (B, K)
    sign = torch.where(first.sum(dim=1, keepdim=True) >= 0, 1.0, -1.0).to(first.dtype)
    projection = (centred @ (first * sign).unsqueeze(2)).squeeze(2)      # (B, positions)
    return projection.view(weighted.shape[:1] + weighted.shape[2:])


# --- the weighted activations: each CAM's terms before the sum over channels --------------------------------
# pytorch-grad-cam's "weighted activations": a CAM is ReLU(sum_k weighted_k) (or, with eigen_smooth, the first
# principal component of weighted); Captum's LayerGradCam(attr_dim_summation=False) returns Grad-CAM's.

def gradcam_weighted(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM's ``mean_spatial(G_k) * A_k``, shape (B, K, *spatial)."""
    activation, gradient = _inputs(activation, gradient)
    return gradient.mean(dim=_spatial_dims(gradient), keepdim=True) * activation


def gradcam_plusplus_weighted(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM++'s ``w_k * A_k`` (see :func:`gradcam_plusplus`)."""
    activation, gradient = _inputs(activation, gradient)
    dims = _spatial_dims(gradient)
    square = gradient * gradient
    alpha = square / (2 * square + activation.sum(dim=dims, keepdim=True) * square * gradient + PLUSPLUS_EPS)
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    return (alpha * torch.relu(gradient)).sum(dim=dims, keepdim=True) * activation


def xgradcam_weighted(activation: Tensor, gradient: Tensor) -> Tensor:
    """XGrad-CAM's ``w_k * A_k`` (see :func:`xgradcam`)."""
    activation, gradient = _inputs(activation, gradient)
    dims = _spatial_dims(gradient)
    weights = (gradient * activation).sum(dim=dims, keepdim=True) / (activation.sum(dim=dims, keepdim=True) +
                                                                     XGRADCAM_EPS)
    return weights * activation


def layercam_weighted(activation: Tensor, gradient: Tensor) -> Tensor:
    """LayerCAM's ``ReLU(G_k) * A_k``."""
    activation, gradient = _inputs(activation, gradient)
    return torch.relu(gradient) * activation


def hirescam_weighted(activation: Tensor, gradient: Tensor) -> Tensor:
    """HiResCAM's (and EigenGrad-CAM's) ``G_k * A_k``."""
    activation, gradient = _inputs(activation, gradient)
    return gradient * activation


def elementwise_weighted(activation: Tensor, gradient: Tensor) -> Tensor:
    """Element-wise Grad-CAM's ``ReLU(G_k * A_k)``."""
    activation, gradient = _inputs(activation, gradient)
    return torch.relu(gradient * activation)


def activation_weighted(activation: Tensor, gradient: Tensor) -> Tensor:
    """Eigen-CAM's weighted activations: ``A`` itself (``G`` is not read)."""
    activation, _ = _inputs(activation, gradient)
    return activation


def eigencam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): the first principal component of ``A`` alone (``G`` is not read),
    with :func:`eigengradcam`'s sign rule, which here makes the map correlate with the centred ``sum_k A_k``."""
    return torch.relu(principal_component(activation_weighted(activation, gradient)))


# --- the registry: every gradient CAM by name ---------------------------------------------------------------

CamFunction = Callable[[Tensor, Tensor], Tensor]
_CAMS: Dict[str, CamFunction] = {
    "gradcam": gradcam, "gradcam++": gradcam_plusplus, "xgradcam": xgradcam, "layercam": guided_pixelwise_cam,
    "hirescam": pixelwise_cam, "elementwise": elementwise_gradcam, "eigengradcam": eigengradcam,
    "eigencam": eigencam,
}
BUILT_IN = tuple(_CAMS)
#: The weighted activations of each built-in CAM.
WEIGHTED: Dict[str, CamFunction] = {
    "gradcam": gradcam_weighted, "gradcam++": gradcam_plusplus_weighted, "xgradcam": xgradcam_weighted,
    "layercam": layercam_weighted, "hirescam": hirescam_weighted, "elementwise": elementwise_weighted,
    "eigengradcam": hirescam_weighted, "eigencam": activation_weighted,
}
#: The CAMs that are always the principal component of their weighted activations, never their sum.
ALWAYS_EIGEN = ("eigengradcam", "eigencam")


class CamError(GuidedSwapError, KeyError, ValueError):
    """A CAM name that is not registered, a bad registration, or a CAM function that returns a wrong shape."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def cam_methods() -> Tuple[str, ...]:
    """The names of every gradient CAM, built-in first, then the user's in the order registered.

    >>> cam_methods()[:7]
    ('gradcam', 'gradcam++', 'xgradcam', 'layercam', 'hirescam', 'elementwise', 'eigengradcam')
    """
    return tuple(_CAMS)


def register_cam(name: str, fn: CamFunction, *, replace: bool = False) -> CamFunction:
    """Make ``fn(A, G) -> (B, *spatial)`` usable by name: ``e.cams[name]``, ``e.layers[L].cams_raw[name]``.

    ``A`` and ``G`` are the (B, K, *spatial) activation and ordinary gradient at the layer (token and
    channels-last captures already turned channels-first). Returns ``fn``.

    >>> import torch, guided_swap as gs
    >>> _ = gs.register_cam("gradient-norm", lambda A, G: G.norm(dim=1))
    >>> "gradient-norm" in gs.cam_methods()
    True
    >>> gs.unregister_cam("gradient-norm")
    """
    if not isinstance(name, str) or not name:
        raise CamError(f"a CAM needs a non-empty string name, got {name!r}")
    if not callable(fn):
        raise CamError(f"register_cam({name!r}, fn): fn must be callable (A, G) -> map, got {type(fn).__name__}")
    if name in BUILT_IN:
        raise CamError(f"{name!r} is a built-in CAM and cannot be replaced; give yours another name")
    if name in _CAMS and not replace:
        raise CamError(f"a CAM named {name!r} is already registered; pass replace=True to replace it")
    _CAMS[name] = fn
    return fn


def unregister_cam(name: str) -> None:
    """Remove a user's CAM (built-in ones stay)."""
    if name in BUILT_IN:
        raise CamError(f"{name!r} is a built-in CAM and cannot be removed")
    if name not in _CAMS:
        raise CamError(f"no CAM named {name!r} is registered; registered: {cam_methods()}")
    del _CAMS[name]


def get_cam(name: str) -> CamFunction:
    """The function registered as ``name``."""
    if not isinstance(name, str) or name not in _CAMS:
        raise CamError(f"{name!r} is not a registered CAM; the CAMs are {cam_methods()} "
                       "(add your own with guided_swap.register_cam)")
    return _CAMS[name]


def compute(name: str, activation: Tensor, gradient: Tensor) -> Tensor:
    """The CAM ``name`` of ``(A, G)``, checked to be one (B, *spatial) map. The maths run in float32 at least
    (:func:`working`: a float16 or bfloat16 model's ``A`` and ``G`` are upcast first, a user's CAM gets them so too),
    and the map keeps that dtype."""
    activation, gradient = _inputs(activation, gradient)
    out = get_cam(name)(activation, gradient)
    expected = activation.shape[:1] + activation.shape[2:]
    if not isinstance(out, Tensor) or out.shape != expected:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CamError(f"the CAM {name!r} returned {shape} for an activation {tuple(activation.shape)}; a CAM "
                       f"function must return one map per sample, {tuple(expected)}")
    return out
