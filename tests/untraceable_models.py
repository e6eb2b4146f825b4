"""Small models that torch.fx symbolic tracing cannot take but torch.export can: shape asserts, Python loops
over sizes, ``int(x.shape[-1])`` arithmetic. Each line where fx stops is marked ``# fx stops here``."""
import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class ShapeAssertNet(nn.Module):
    """Asserts on the input's shape, as many research models do; ReLU as a module and functionally."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.relu = nn.ReLU(inplace=True)
        self.block = _conv_bn(16, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        assert x.shape[1] == 3, f"expected RGB input, got {x.shape[1]} channels"  # fx stops here
        assert x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0, "height and width must be multiples of 8"
        x = self.relu(self.stem(x))
        x = F.relu(self.block(x) + x)
        return self.head(x.mean(dim=(2, 3)))


class ShapeLoopNet(nn.Module):
    """Downsamples in a Python loop until the map is 8 pixels wide (the count comes from the input size)."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 16)
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        while x.shape[-1] > 8:  # fx stops here
            x = self.down(x)
        x = F.hardtanh(x * 1.5, 0.0, 6.0)
        return self.head(x.mean(dim=(2, 3)))


class ShapeArithmeticNet(nn.Module):
    """Pads to a multiple of 16 with sizes computed by ``int()``, then reshapes by the padded size."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.layer = nn.Sequential(_conv_bn(8, 8), nn.ReLU(inplace=True), _conv_bn(8, 16, 2))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        height, width = int(x.shape[-2]), int(x.shape[-1])  # fx stops here
        x = F.pad(x, (0, (16 - width % 16) % 16, 0, (16 - height % 16) % 16))
        x = F.relu(self.stem(x), inplace=True)
        x = self.layer(x).relu_()
        pooled = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
        return self.head(pooled)


class DataDependentNet(nn.Module):
    """Branches on a tensor value: neither fx nor torch.export can capture this."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            return F.relu(x).mean(dim=(2, 3))
        return x.mean(dim=(2, 3))


UNTRACEABLE = {"ShapeAssertNet": ShapeAssertNet, "ShapeLoopNet": ShapeLoopNet,
               "ShapeArithmeticNet": ShapeArithmeticNet}
