from torch import nn

from ._impl import finish


class BasicBlock(nn.Module):
    """relu(body(x) + shortcut(x)) with body = conv3x3 -> BN+ReLU -> conv3x3 -> BN, and a 1x1 conv
    + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()  # after the sum, so it cannot be fused into a layer

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet of basic blocks for 1x8x8 images: a conv stem, three blocks
    (8x8 -> 8x8 -> 4x4 -> 2x2, widths w, 2w, 4w), global average pool and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, *, impl: str = "tkernels"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2),
                                    BasicBlock(2 * width, 4 * width, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))
        finish(self, impl)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
