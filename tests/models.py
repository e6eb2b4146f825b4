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


class DisguisedRectifiers(nn.Module):
    """ReLU and ReLU6 written as clamps, thresholds and hardtanh, in and out of place; activations with no rule."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.threshold = nn.Threshold(0, 0)
        self.threshold_inplace = nn.Threshold(0.0, 0.0, inplace=True)
        self.not_a_relu = nn.Threshold(0.5, 0.0)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.clamp(self.conv1(x), min=0)          # torch.clamp(min=0)
        x = (x - 0.01).clamp(min=0)                    # Tensor.clamp(min=0)
        x = self.conv2(x).clamp_min(0)                 # Tensor.clamp_min(0)
        x = torch.clamp_min(x - 0.01, 0.0)             # torch.clamp_min(0)
        x = F.threshold(x * 2.0 - 0.01, 0, 0)          # F.threshold(0, 0)
        x = self.threshold(self.conv3(x))              # nn.Threshold(0, 0)
        x = self.threshold_inplace(x - 0.01)           # nn.Threshold(0, 0), in place
        y = x * 1.5 - 0.01
        y.clamp_(min=0)                                # Tensor.clamp_(min=0), result unused
        y = y - 0.01
        torch.clamp_(y, 0)                             # torch.clamp_(0), result unused
        y = y * 1.2 - 0.01
        y.clamp_min_(0)                                # Tensor.clamp_min_(0)
        y = y - 0.01
        F.threshold_(y, 0.0, 0.0)                      # torch.threshold_(0, 0)
        y = torch.clip(y * 1.1 - 0.01, min=0.0)        # torch.clip(min=0)
        z = F.hardtanh(y * 40.0, 0, 6)                 # F.hardtanh(0, 6)
        z = torch.clamp(z * 2.0 - 0.5, 0, 6)           # torch.clamp(0, 6)
        z = (z * 1.5 - 0.5).clamp(0.0, 6.0)            # Tensor.clamp(0, 6)
        z = z * 1.2 - 0.3
        z.clamp_(min=0, max=6)                         # Tensor.clamp_(0, 6)
        z = (z - 0.2).clip(0, 6)                       # Tensor.clip(0, 6)
        w = self.conv4(z) - 1.0                        # left alone from here on: no rule for these
        w = (self.leaky(w) + F.gelu(w) + torch.where(w > 0, w, 0.0) + torch.maximum(w, torch.zeros_like(w))
             + w.clamp(0, 1) + w * (w > 0).float() + self.not_a_relu(w) + torch.clamp(w, min=0.1))
        return self.fc(w.mean(dim=(2, 3)))


DISGUISED_SWAPS = {
    "clamp": "torch.clamp(min=0)", "clamp_1": "Tensor.clamp(min=0)", "clamp_min": "Tensor.clamp_min(0)",
    "clamp_min_1": "torch.clamp_min(0)", "_threshold": "F.threshold(0, 0)", "threshold": "nn.Threshold(0, 0)",
    "threshold_inplace": "nn.Threshold(0, 0)", "clamp_": "Tensor.clamp_(min=0)", "clamp__1": "torch.clamp_(min=0)",
    "clamp_min_": "Tensor.clamp_min_(0)", "threshold_": "torch.threshold_(0, 0)", "clip": "torch.clip(min=0)",
    "hardtanh": "F.hardtanh(0, 6)", "clamp_2": "torch.clamp(0, 6)", "clamp_3": "Tensor.clamp(0, 6)",
    "clamp__2": "Tensor.clamp_(0, 6)", "clip_1": "Tensor.clip(0, 6)",
}
DISGUISED_LEFT_ALONE = {
    "leaky": "nn.LeakyReLU", "gelu": "F.gelu", "where": "torch.where(cond, x, 0)", "maximum": "torch.maximum(x, 0)",
    "clamp_4": "Tensor.clamp(0, 1)", "mul_8": "x * (x > 0)", "not_a_relu": "nn.Threshold",
}


class VolumeCNN(nn.Module):
    """A small 3-d CNN for (B, 1, D, H, W) volumes, in the manner of medical-imaging classifiers."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool3d(2))
        self.block = nn.Sequential(nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(inplace=True))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(F.adaptive_avg_pool3d(x, 1).flatten(1))


class SignalCNN(nn.Module):
    """A small 1-d CNN for (B, 2, L) signals, a functional ReLU, and a mean over time."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 5, padding=2)
        self.conv2 = nn.Conv1d(8, 16, 5, stride=2, padding=2)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.fc(x.mean(dim=-1))


class SqueezeExcite(nn.Module):
    """An SE gate: global mean, two 1x1 convs, a sigmoid, multiplied back into the map."""

    def __init__(self, channels):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class EcaGate(nn.Module):
    """An ECA gate: a Conv1d across channels of the pooled vector, (B, 1, C)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(F.adaptive_avg_pool2d(x, 1).view(x.shape[0], 1, -1))
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)


class SpatialGate(nn.Module):
    """A CBAM-style spatial attention gate: a (B, 1, h, w) map from channel mean and max."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class GatedNet(nn.Module):
    """SE, ECA and spatial gates after the last stage, then pooling and a 1x1 conv head *after* the pooling
    (the timm MobileNetV3 / GhostNet / LCNet layout): ``auto`` must take ``gates``, the last spatial map."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.gates = nn.Sequential(SqueezeExcite(16), EcaGate(), SpatialGate())
        self.conv_head = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.gates(self.stage(self.stem(x)))
        x = F.relu(self.conv_head(F.adaptive_avg_pool2d(x, 1)))
        return self.fc(x.flatten(1))


class SpaceToDepthNet(nn.Module):
    """TResNet's stem: the input is rearranged into 4x the channels before the first convolution."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class TinySegmenter(nn.Module):
    """A segmentation net without global pooling: backbone, a head module, and an auxiliary head."""

    def __init__(self, classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, classes, 1))
        self.aux = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        low = self.backbone[1](self.backbone[0](x))
        high = self.backbone[3](self.backbone[2](low))
        out = F.interpolate(self.head(high), size=size, mode="bilinear", align_corners=False)
        return {"out": out, "aux": F.interpolate(self.aux(low), size=size, mode="bilinear", align_corners=False)}


class FunctionalBatchNormNet(nn.Module):
    """A batch norm written functionally (as timm's BatchNormAct2d is traced): tracing in training mode bakes
    ``training=True`` into the graph, so only copies of the buffers keep the probe from updating them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.running_mean, self.running_var, training=self.training, momentum=0.5)
        return self.fc(F.relu(x).mean((2, 3)))


class CifarNet(nn.Module):
    """A CIFAR-size CNN (32 px) whose Linear head has a fixed input size: it runs at 32 px only."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))
