"""FullGrad on the run-time capture: the private mirror runs once with its own, ordinary rectifiers (no rule is
swapped in), and hooks on its convolution and BatchNorm modules record the gradient at each output, as
pytorch-grad-cam does on the model itself. The hooks live on the mirror only and are removed after the pass.

A gradient hook registered on a module's output before an in-place op overwrites it (the ReLU after a
BatchNorm) receives the gradient at the output as the module returned it, which is what FullGrad reads.

>>> import torch, torchvision, guided_swap as gs
>>> from guided_swap.capture.runtime.live_swap import private_mirror
>>> model = private_mirror(torchvision.models.resnet18().eval())
>>> result = bias_pass(model, torch.randn(2, 3, 64, 64), gs.core.targets.as_score(None))
>>> len(result.biases), tuple(result.biases[0][1].shape)
(20, (2, 64, 32, 32))
"""
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ...core.pass_cams import BiasPass, module_bias
from ...core.targets import Score
from ..base import gradients

def bias_pass(model: nn.Module, x: Any, score: Score, classes: Optional[Tensor] = None) -> BiasPass:
    """One forward and backward of ``model`` (the capture's mirror) for FullGrad (module docstring)."""
    records: List[Tuple[Tensor, List[Tensor]]] = []
    handles = [module.register_forward_hook(_recorder(bias, records))
               for module, bias in _bias_modules(model)]
    try:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in ([x] if isinstance(x, Tensor) else x)]
            outputs = model(leaves[0] if isinstance(x, Tensor) else type(x)(leaves))
            batch = len(leaves) if not isinstance(x, Tensor) else x.shape[0]
            main, _ = score(outputs, {}, batch, classes)
            grads = gradients(main.sum(), leaves)
    finally:
        for handle in handles:
            handle.remove()
    input_grad = grads[0] if isinstance(x, Tensor) else torch.stack(grads)
    biases = tuple((bias, got[0]) for bias, got in records if got)
    return BiasPass(outputs, main.detach(), input_grad, biases)


def _bias_modules(model: nn.Module) -> List[Tuple[nn.Module, Tensor]]:
    found = [(module, module_bias(name, module)) for name, module in model.named_modules()]
    return [(module, bias.detach()) for module, bias in found if bias is not None]


def _recorder(bias: Tensor, records: List[Tuple[Tensor, List[Tensor]]]):
    """A forward hook that registers, on each tensor output, a gradient hook keeping the gradient."""
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            got: List[Tensor] = []
            records.append((bias, got))
            output.register_hook(lambda grad: got.append(grad.detach()))
    return hook
