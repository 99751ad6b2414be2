from torch import nn

from ._impl import finish


class MLP(nn.Module):
    """Three fully connected layers on the flattened 8x8 image: 64 -> 128 -> 64 -> classes,
    ReLU fused into the first two."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128, *, impl: str = "tkernels"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, num_classes),
        )
        finish(self, impl)

    def forward(self, x):
        return self.net(x)
