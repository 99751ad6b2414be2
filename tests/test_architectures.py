"""The block patterns of torchvision's classification families, written out here (no torchvision
dependency), converted with ``convert(fuse=True)`` and compared with their torch twins: outputs,
input and parameter gradients and running buffers, in train and eval mode, on both backends.
Shapes are tiny (batch 2, 8x8, <= 16 channels) so the Triton interpreter runs them quickly."""
import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as TF

import tkernels
from helpers import assert_close, device_for, noise_magnitude


def conv_bn_act(c_in, c_out, kernel_size=3, stride=1, groups=1, act=nn.ReLU):
    """torchvision's Conv2dNormActivation: a Sequential, so convert can fuse BN and its activation."""
    layers = [nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU) else act())
    return nn.Sequential(*layers)


class VGGBN(nn.Module):
    def __init__(self, dropout=0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(64, 16), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 downsample and the in-place residual add."""

    def __init__(self, c_in=8, c_out=16, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck (groups=1) and ResNeXt/RegNet grouped bottleneck (groups>1), stride on the 3x3."""

    def __init__(self, c_in=16, width=8, c_out=16, stride=1, groups=1, with_conv_bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=with_conv_bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class Fire(nn.Module):
    """SqueezeNet fire module: activations held as attributes, used in place outside a Sequential."""

    def __init__(self, c_in=8, squeeze=4, expand=6):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation as EfficientNet builds it (SiLU, then Sigmoid scale)."""

    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual (ReLU6, which has no tkernels twin; `x + f(x)`) and EfficientNet's
    MBConv (SiLU, squeeze-excitation, in-place `result += x`): expand 1x1, depthwise 3x3, [SE,]
    linear 1x1 projection, residual."""

    def __init__(self, c=8, expand_ratio=2, act=nn.ReLU6, squeeze_excitation=False):
        super().__init__()
        hidden = c * expand_ratio
        layers = [conv_bn_act(c, hidden, 1, act=act), conv_bn_act(hidden, hidden, 3, groups=hidden, act=act)]
        if squeeze_excitation:
            layers.append(SqueezeExcitation(hidden, max(1, c // 4)))
        self.block = nn.Sequential(*layers, conv_bn_act(hidden, c, 1, act=None))
        self.inplace_add = squeeze_excitation

    def forward(self, x):
        result = self.block(x)
        if self.inplace_add:
            result += x
            return result
        return x + result


class DenseLayer(nn.Module):
    """DenseNet: BN-ReLU-conv pre-activation (attributes, as torchvision) on the concatenated features."""

    def __init__(self, c_in=8, growth=4, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        concatenated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlockAndTransition(nn.Module):
    def __init__(self, c_in=8, growth=4):
        super().__init__()
        self.layer1 = DenseLayer(c_in, growth)
        self.layer2 = DenseLayer(c_in + growth, growth)
        # the transition is a Sequential: BN + ReLU fuse there
        self.transition = nn.Sequential(nn.BatchNorm2d(c_in + 2 * growth), nn.ReLU(inplace=True),
                                        nn.Conv2d(c_in + 2 * growth, 8, 1, bias=False), nn.AvgPool2d(2, 2))

    def forward(self, x):
        features = [x]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        return self.transition(torch.cat(features, 1))


class ChannelShuffle(nn.Module):
    """A parameter-free leaf that tkernels has no twin for: convert leaves it and says so."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnits(nn.Module):
    """ShuffleNetV2: a stride-2 unit (both branches) then a stride-1 unit (split, branch, cat, shuffle)."""

    def __init__(self, c_in=8, c_out=16):
        super().__init__()
        half = c_out // 2
        self.branch1 = nn.Sequential(nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                                     nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.down_branch2 = self._branch(c_in, half, 2)
        self.branch2 = self._branch(half, half, 1)
        self.shuffle = ChannelShuffle(2)

    @staticmethod
    def _branch(c_in, c_out, stride):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                             nn.Conv2d(c_out, c_out, 3, stride, 1, groups=c_out, bias=False), nn.BatchNorm2d(c_out),
                             nn.Conv2d(c_out, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

    def forward(self, x):
        out = self.shuffle(torch.cat((self.branch1(x), self.down_branch2(x)), 1))
        x1, x2 = out.chunk(2, dim=1)
        return self.shuffle(torch.cat((x1, self.branch2(x2)), 1))


class BasicConv2d(nn.Module):
    """GoogLeNet/Inception's conv: conv (no bias), BN (eps 1e-3), then torch's functional in-place relu."""

    def __init__(self, c_in, c_out, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return TF.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    def __init__(self, c_in=8):
        super().__init__()
        self.branch1 = BasicConv2d(c_in, 4, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(c_in, 4, kernel_size=1), BasicConv2d(4, 6, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(c_in, 2, kernel_size=1), BasicConv2d(2, 4, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(c_in, 4, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# name -> (model factory, input channels, layer types convert must leave alone, minimum fusions)
FAMILIES = {
    "vgg_bn": (lambda: VGGBN(dropout=0.0), 3, set(), 3),
    "resnet_basic": (BasicBlock, 8, set(), 0),
    "resnet_bottleneck": (lambda: Bottleneck(16, 8, 16, stride=2, with_conv_bias=True), 16, set(), 0),
    "resnext_grouped_bottleneck": (lambda: Bottleneck(16, 16, 16, stride=1, groups=4), 16, set(), 0),
    "squeezenet_fire": (Fire, 8, set(), 0),
    "mobilenet_v2_inverted_residual": (InvertedResidual, 8, {"torch.nn.ReLU6"}, 0),
    "efficientnet_mbconv_se": (lambda: InvertedResidual(act=nn.SiLU, squeeze_excitation=True), 8, set(), 2),
    "densenet_dense_layers": (DenseBlockAndTransition, 8, set(), 1),
    "shufflenet_v2_units": (ShuffleUnits, 8, {"test_architectures.ChannelShuffle"}, 4),
    "inception": (Inception, 8, set(), 0),
}


def _randomize_norms(model):
    """Non-trivial affine parameters and running statistics, so eval mode checks something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2.0)


def _grads(model, x, grad):
    leaf = x.clone().requires_grad_()
    out = model(leaf)
    out.backward(grad)
    return out.detach(), leaf.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def models():
    """One torch model per family and its converted twin (with the report); built once."""
    built = {}
    for name, (factory, _, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        theirs = factory()
        _randomize_norms(theirs)
        built[name] = theirs
    return built


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_torch(backend, family, training, models):
    dev = device_for(backend)
    _, channels, left_alone, min_fused = FAMILIES[family]
    theirs = copy.deepcopy(models[family]).to(dev).train(training)
    ours, report = tkernels.nn.convert(copy.deepcopy(theirs), fuse=True, return_report=True)

    # the report: what convert left as torch, by type, and nothing else; the fusions it made
    assert {m.type_name for m in report.left_alone} == left_alone, str(report)
    assert len(report.fused) >= min_fused, str(report)
    kept = {type(m).__name__ for m in ours.modules()
            if not type(m).__module__.startswith("tkernels") and not list(m.children())}
    assert kept <= {t.split(".")[-1] for t in left_alone} | {"Identity"}, f"unconverted leaves {kept}: {report}"

    torch.manual_seed(1)
    x = torch.randn(2, channels, 8, 8, device=dev)
    with torch.no_grad():
        out_shape = copy.deepcopy(theirs)(x).shape
    grad = torch.randn(out_shape, device=dev)
    out_t, dx_t, dparams_t = _grads(theirs, x, grad)
    out_k, dx_k, dparams_k = _grads(ours, x, grad)

    reduction = 16 * 9 * 2 * 64  # conv reductions times the batch-norm reductions they feed
    assert_close(out_k, out_t, reduction=reduction, msg=f"{family} output")
    assert_close(dx_k, dx_t, reduction=reduction, msg=f"{family} input gradient")
    assert dparams_k.keys() == dparams_t.keys()
    for name, g in dparams_t.items():
        assert (dparams_k[name] is None) == (g is None), name
        if g is not None:
            assert_close(dparams_k[name], g, reduction=reduction, magnitude=noise_magnitude(dparams_t, name),
                         msg=f"{family} gradient of {name}")
    buffers_t = dict(theirs.named_buffers())
    for name, value in ours.named_buffers():
        if value.is_floating_point():
            assert_close(value, buffers_t[name], msg=f"{family} buffer {name}")
        else:
            assert torch.equal(value, buffers_t[name]), name
    assert buffers_t.keys() == dict(ours.named_buffers()).keys()
