"""Hand-written models for the tests: every ReLU spelling, and a ResNet block written the usual way."""
import torch
import torch.nn.functional as F
from torch import nn


class EverySpelling(nn.Module):
    """Calls ReLU in every spelling guided_swap knows, plus activations that must be left alone."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6(inplace=True)
        self.silu = nn.SiLU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))                # nn.ReLU
        x = self.relu(x - 0.01)                     # the same module, called again
        x = self.relu_inplace(self.conv2(x))        # nn.ReLU(inplace=True)
        x = F.relu(x * 2.0 - 0.01, inplace=True)    # F.relu, in place by keyword
        x = F.relu(x - 0.01, True)                  # F.relu, in place by position
        x = torch.relu(self.conv3(x))               # torch.relu
        y = x - 0.01
        torch.relu_(y)                              # torch.relu_, result unused
        y = y * 1.5
        y.relu_()                                   # Tensor.relu_, result unused
        z = (y - 0.01).relu()                       # Tensor.relu
        z = F.relu6(z * 40.0)                       # F.relu6
        z = self.relu6(z * 2.0 - 0.5)               # nn.ReLU6(inplace=True)
        z = self.silu(z) + torch.sigmoid(z)         # left alone
        return self.fc(z.mean(dim=(2, 3)))


EVERY_SPELLING_SWAPS = {
    "relu": "nn.ReLU", "relu_1": "nn.ReLU", "relu_inplace": "nn.ReLU", "relu_2": "F.relu", "relu_3": "F.relu",
    "relu_4": "torch.relu", "relu_": "torch.relu_", "relu__1": "Tensor.relu_", "relu_5": "Tensor.relu",
    "relu6": "F.relu6", "relu6_1": "nn.ReLU6",
}


class FunctionalBlock(nn.Module):
    """A ResNet basic block as people write it by hand: F.relu and ``out += shortcut(x)``."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class FunctionalResNet(nn.Module):
    """A small CIFAR-style ResNet of FunctionalBlocks with an MLP head (so ReLUs follow the last conv)."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(FunctionalBlock(16, 16), FunctionalBlock(16, 16))
        self.layer2 = nn.Sequential(FunctionalBlock(16, 32, 2), FunctionalBlock(32, 32))
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(inplace=True), nn.Linear(64, classes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.head(out)
