from torch import nn

from ._impl import finish


class LeNet(nn.Module):
    """LeNet-style CNN with batch norm for 1x8x8 images.

    Two stages of 3x3 conv (no bias: BN follows) -> BatchNorm2d with fused ReLU -> 2x2 max pool
    (8x8 -> 4x4 -> 2x2), then Linear -> BatchNorm1d with fused ReLU -> Linear.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, *, impl: str = "tkernels"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 2 * 2, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, num_classes),
        )
        finish(self, impl)

    def forward(self, x):
        return self.classifier(self.features(x))
