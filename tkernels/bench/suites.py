"""Benchmark suites: shape lists taken from real models, kept as data.

An entry is (op, dims, params, label); how an op reads its dims is declared in
:mod:`tkernels.bench.cases` (`tkernels bench --list` prints it). Batch sizes are per-GPU
training batches; edit the numbers here, not the code that uses them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

# ---------------------------------------------------------------------------------------------
# Linear layers: (label, M rows, N out_features, K in_features, fused activation)
# ---------------------------------------------------------------------------------------------
LINEARS = [
    ("square 4096^3, gelu", 4096, 4096, 4096, "gelu"),
    ("transformer d=1024 FFN up, 8192 tokens", 8192, 4096, 1024, "gelu"),
    ("transformer d=1024 FFN down, 8192 tokens", 8192, 1024, 4096, "identity"),
    ("transformer d=1024 QKV, 8192 tokens", 8192, 3072, 1024, "identity"),
    ("LLaMA-7B MLP up, 4096 tokens", 4096, 11008, 4096, "silu"),
    ("MLP 4096->4096, batch 128", 128, 4096, 4096, "relu"),
    ("MLP 4096->4096, batch 16", 16, 4096, 4096, "relu"),
    ("MNIST MLP 784->1024, batch 64", 64, 1024, 784, "relu"),
    ("ResNet-50 fc 2048->1000, batch 32", 32, 1000, 2048, "identity"),
]

# ---------------------------------------------------------------------------------------------
# Convolutions: (label, C_in, H, W, C_out, kernel, stride); padding = kernel // 2.
# ResNet-50 as in torchvision (v1.5: the stride sits on the 3x3), unique shapes only.
# ---------------------------------------------------------------------------------------------
RESNET50_BATCH = 32
RESNET50_CONVS = [
    ("conv1 7x7/2", 3, 224, 224, 64, 7, 2),
    ("layer1 1x1 64->64", 64, 56, 56, 64, 1, 1),
    ("layer1 3x3 64", 64, 56, 56, 64, 3, 1),
    ("layer1 1x1 64->256 (+downsample)", 64, 56, 56, 256, 1, 1),
    ("layer1 1x1 256->64", 256, 56, 56, 64, 1, 1),
    ("layer2.0 1x1 256->128", 256, 56, 56, 128, 1, 1),
    ("layer2.0 3x3/2 128", 128, 56, 56, 128, 3, 2),
    ("layer2 1x1 128->512", 128, 28, 28, 512, 1, 1),
    ("layer2.0 downsample 1x1/2", 256, 56, 56, 512, 1, 2),
    ("layer2 1x1 512->128", 512, 28, 28, 128, 1, 1),
    ("layer2 3x3 128", 128, 28, 28, 128, 3, 1),
    ("layer3.0 1x1 512->256", 512, 28, 28, 256, 1, 1),
    ("layer3.0 3x3/2 256", 256, 28, 28, 256, 3, 2),
    ("layer3 1x1 256->1024", 256, 14, 14, 1024, 1, 1),
    ("layer3.0 downsample 1x1/2", 512, 28, 28, 1024, 1, 2),
    ("layer3 1x1 1024->256", 1024, 14, 14, 256, 1, 1),
    ("layer3 3x3 256", 256, 14, 14, 256, 3, 1),
    ("layer4.0 1x1 1024->512", 1024, 14, 14, 512, 1, 1),
    ("layer4.0 3x3/2 512", 512, 14, 14, 512, 3, 2),
    ("layer4 1x1 512->2048", 512, 7, 7, 2048, 1, 1),
    ("layer4.0 downsample 1x1/2", 1024, 14, 14, 2048, 1, 2),
    ("layer4 1x1 2048->512", 2048, 7, 7, 512, 1, 1),
    ("layer4 3x3 512", 512, 7, 7, 512, 3, 1),
]

VGG16_BATCH = 16
VGG16_CONVS = [  # every VGG-16 conv is 3x3, stride 1, padding 1, with bias
    ("conv1_1 3->64", 3, 224, 224, 64, 3, 1),
    ("conv1_2 64->64", 64, 224, 224, 64, 3, 1),
    ("conv2_1 64->128", 64, 112, 112, 128, 3, 1),
    ("conv2_2 128->128", 128, 112, 112, 128, 3, 1),
    ("conv3_1 128->256", 128, 56, 56, 256, 3, 1),
    ("conv3_x 256->256", 256, 56, 56, 256, 3, 1),
    ("conv4_1 256->512", 256, 28, 28, 512, 3, 1),
    ("conv4_x 512->512", 512, 28, 28, 512, 3, 1),
    ("conv5_x 512->512", 512, 14, 14, 512, 3, 1),
]

# Batch norms after each ResNet-50 conv: (label, C, H, W) at RESNET50_BATCH.
RESNET50_BATCH_NORMS = [
    ("bn1 stem", 64, 112, 112),
    ("layer1 bn 64", 64, 56, 56),
    ("layer1 bn 256", 256, 56, 56),
    ("layer2.0 bn1 128 @56", 128, 56, 56),
    ("layer2 bn 128", 128, 28, 28),
    ("layer2 bn 512", 512, 28, 28),
    ("layer3.0 bn1 256 @28", 256, 28, 28),
    ("layer3 bn 256", 256, 14, 14),
    ("layer3 bn 1024", 1024, 14, 14),
    ("layer4.0 bn1 512 @14", 512, 14, 14),
    ("layer4 bn 512", 512, 7, 7),
    ("layer4 bn 2048", 2048, 7, 7),
]
# Batch norm at full ResNet-50 training batch, both layouts: the largest spatial map (stem), a
# middle one and the smallest (7x7, 49 positions per (n, c): short tiles); inputs of 100-400 MB
# in bf16, far beyond L2, so GB/s against the copy bandwidth is what the kernels stream.
RESNET50_BN_LARGE_BATCH = 256
RESNET50_BN_LARGE = [("bn1 stem", 64, 112, 112), ("layer1 bn 256", 256, 56, 56), ("layer4 bn 2048", 2048, 7, 7)]

# Pools: (label, op, N, C, H, W, params)
POOLS = [
    ("ResNet stem maxpool 3x3/2", "max_pool2d", 32, 64, 112, 112, {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("VGG pool1 maxpool 2x2/2", "max_pool2d", 16, 64, 224, 224, {"kernel_size": 2, "stride": 2, "padding": 0}),
    ("VGG pool5 maxpool 2x2/2", "max_pool2d", 16, 512, 14, 14, {"kernel_size": 2, "stride": 2, "padding": 0}),
    ("ResNet-D shortcut avgpool 2x2/2", "avg_pool2d", 32, 256, 56, 56, {"kernel_size": 2, "stride": 2, "padding": 0}),
    ("Inception avgpool 3x3/1", "avg_pool2d", 32, 192, 28, 28, {"kernel_size": 3, "stride": 1, "padding": 1}),
    ("ResNet-50 head global avgpool", "adaptive_avg_pool2d", 32, 2048, 7, 7, {"output_size": 1}),
    ("VGG head adaptive avgpool 14->7", "adaptive_avg_pool2d", 16, 512, 14, 14, {"output_size": 7}),
]

# Classifier heads: (label, rows N, classes C)
CLASSIFIERS = [
    ("CIFAR-10 head, batch 65536", 65536, 10),
    ("ImageNet head, batch 256", 256, 1000),
    ("LLaMA-2 vocab, 4096 tokens", 4096, 32000),
    ("LLaMA-3 vocab, 4096 tokens", 4096, 128000),
]

# Pointwise layers: (label, op, dims, params)
POINTWISE = [
    ("transformer FFN gelu, 8192x4096", "gelu", (8192, 4096), {}),
    ("transformer FFN silu, 8192x4096", "silu", (8192, 4096), {}),
    ("ResNet-50 relu, 32x256x56x56", "relu", (32, 256, 56, 56), {}),
    ("transformer dropout p=0.1, 8192x4096", "dropout", (8192, 4096), {"p": 0.1}),
    ("autoencoder mse, 256x3x224x224", "mse_loss", (256, 3, 224, 224), {}),
]


# ---------------------------------------------------------------------------------------------
# Optimizer parameter lists
# ---------------------------------------------------------------------------------------------
def resnet50_parameter_shapes(num_classes: int = 1000) -> List[Tuple[int, ...]]:
    """The parameter tensors of torchvision's ResNet-50, in registration order (161 tensors,
    25,557,032 values for 1000 classes)."""
    shapes: List[Tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for block in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(4 * width, in_ch, 1, 1), (4 * width,), (4 * width,)]
            in_ch = 4 * width
    return shapes + [(num_classes, 2048), (num_classes,)]


PARAMETER_LISTS = {
    "resnet50": resnet50_parameter_shapes,
}


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    op: str
    dims: Tuple[int, ...]
    params: Dict[str, object] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    entries: Tuple[Entry, ...]

    @property
    def ops(self) -> List[str]:
        return list(dict.fromkeys(e.op for e in self.entries))


def _convs(rows, batch, bias):
    return tuple(Entry("conv2d", (batch, c, h, w, k, r), {"stride": s, "padding": r // 2, "bias": int(bias)}, label)
                 for label, c, h, w, k, r, s in rows)


def _suites() -> Dict[str, Suite]:
    classifier_ops = ("softmax", "log_softmax", "cross_entropy")
    suites = [
        Suite("linear", "MLP and transformer linears (fused bias + activation), M x N x K",
              tuple(Entry("linear", (m, n, k), {"activation": act}, label) for label, m, n, k, act in LINEARS)),
        Suite("resnet50-conv", f"ResNet-50 convolutions, batch {RESNET50_BATCH}",
              _convs(RESNET50_CONVS, RESNET50_BATCH, bias=False)),
        Suite("vgg16-conv", f"VGG-16 convolutions (with bias), batch {VGG16_BATCH}",
              _convs(VGG16_CONVS, VGG16_BATCH, bias=True)),
        Suite("resnet50-bn", f"ResNet-50 batch norms in training mode, batch {RESNET50_BATCH}",
              tuple(Entry("batch_norm", (RESNET50_BATCH, c, h, w), {}, label)
                    for label, c, h, w in RESNET50_BATCH_NORMS)),
        Suite("resnet50-bn-large", f"ResNet-50 batch norms at batch {RESNET50_BN_LARGE_BATCH}, NCHW and channels_last",
              tuple(Entry("batch_norm", (RESNET50_BN_LARGE_BATCH, c, h, w), {"channels_last": cl},
                          f"{label}{' channels_last' if cl else ''}")
                    for label, c, h, w in RESNET50_BN_LARGE for cl in (0, 1))),
        Suite("pool", "max/avg/adaptive-avg pooling at ResNet and VGG shapes",
              tuple(Entry(op, (n, c, h, w), params, label) for label, op, n, c, h, w, params in POOLS)),
        Suite("classifier", "softmax, log_softmax and cross-entropy at classifier sizes C=10..128000",
              tuple(Entry(op, (n, c), {}, f"{label}") for op in classifier_ops for label, n, c in CLASSIFIERS)),
        Suite("pointwise", "activations, dropout and MSE at transformer and ResNet sizes",
              tuple(Entry(op, dims, params, label) for label, op, dims, params in POINTWISE)),
        Suite("optim", "SGD (momentum, weight decay) and AdamW steps over ResNet-50's parameters",
              (Entry("SGD", (), {"model": "resnet50"}, "ResNet-50 parameters"),
               Entry("AdamW", (), {"model": "resnet50"}, "ResNet-50 parameters"))),
        Suite("smoke", "tiny shapes of every op, for CPU runs and CI (not a performance suite)", (
            Entry("linear", (33, 40, 24), {"activation": "gelu"}, "tiny linear"),
            Entry("conv2d", (2, 5, 12, 12, 8, 3), {"stride": 1, "padding": 1, "bias": 1}, "tiny conv 3x3"),
            Entry("batch_norm", (4, 6, 5, 5), {}, "tiny batch norm"),
            Entry("max_pool2d", (2, 3, 11, 11), {"kernel_size": 3, "stride": 2, "padding": 1}, "tiny maxpool"),
            Entry("avg_pool2d", (2, 3, 10, 10), {"kernel_size": 2, "stride": 2, "padding": 0}, "tiny avgpool"),
            Entry("adaptive_avg_pool2d", (2, 6, 7, 7), {"output_size": 1}, "tiny global pool"),
            Entry("softmax", (17, 10), {}, "tiny softmax"),
            Entry("log_softmax", (17, 10), {}, "tiny log_softmax"),
            Entry("cross_entropy", (17, 10), {}, "tiny cross-entropy"),
            Entry("mse_loss", (17, 9), {}, "tiny mse"),
            Entry("dropout", (64, 64), {"p": 0.5}, "tiny dropout"),
            Entry("relu", (17, 33), {}, "tiny relu"),
            Entry("gelu", (17, 33), {}, "tiny gelu"),
            Entry("SGD", (100, 3), {}, "3 tensors of 100"),
            Entry("AdamW", (100, 3), {}, "3 tensors of 100"),
        )),
    ]
    return {s.name: s for s in suites}


SUITES: Dict[str, Suite] = _suites()

# What runs when neither OPS nor --suite is given.
DEFAULT_GPU_SUITES = ("linear", "resnet50-conv", "resnet50-bn", "pool", "classifier", "pointwise", "optim")
DEFAULT_CPU_SUITES = ("smoke",)
