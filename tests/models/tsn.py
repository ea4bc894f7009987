"""mmaction2-style TSN (Temporal Segment Network) float reference (seed 000).

Structure and attribute names follow mmcv / mmaction2 (0.x) so the printed
module tree matches the user report:

    Recognizer2D
      backbone: ResNet
        conv1: ConvModule(conv, bn, activate)
        maxpool
        layer1..layer4: Sequential of Bottleneck
          conv1, conv2: ConvModule(conv, bn, activate)
          conv3: ConvModule(conv, bn)            # act_cfg=None
          relu: ReLU(inplace=True)                # shared, applied after the add
          downsample: ConvModule(conv, bn)        # act_cfg=None (first block only)
      cls_head: TSNHead
        loss_cls: CrossEntropyLoss (parameter-free, unused in forward)
        consensus: AvgConsensus
        avg_pool: AdaptiveAvgPool2d((1, 1))
        dropout: Dropout(p=0.4)
        fc_cls: Linear(2048, num_classes)

Input is the already-flattened clip batch ``(N * num_segs, 3, H, W)``; the head
reshapes to ``(N, num_segs, C, 1, 1)`` and averages over segments.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

__all__ = ["ConvModule", "Bottleneck", "BasicBlock", "ResNet", "AvgConsensus", "TSNHead", "Recognizer2D", "tsn_r50"]


# --------------------------------------------------------------------------------------
# mmcv-like building block
# --------------------------------------------------------------------------------------
_NORM_ABBR = {"BN": "bn", "BN2d": "bn", "SyncBN": "bn", "GN": "gn", "IN": "in", "LN": "ln"}


def _build_norm(cfg: Dict, num_features: int) -> Tuple[str, nn.Module]:
    cfg = dict(cfg)
    layer_type = cfg.pop("type")
    cfg.pop("requires_grad", None)
    if layer_type in ("BN", "BN2d", "SyncBN"):
        layer = nn.BatchNorm2d(num_features, **cfg)
    elif layer_type == "GN":
        layer = nn.GroupNorm(num_channels=num_features, **cfg)
    else:  # pragma: no cover - not needed by the zoo
        raise KeyError(layer_type)
    return _NORM_ABBR[layer_type], layer


def _build_activation(cfg: Dict) -> nn.Module:
    cfg = dict(cfg)
    layer_type = cfg.pop("type")
    return {"ReLU": nn.ReLU, "ReLU6": nn.ReLU6, "LeakyReLU": nn.LeakyReLU, "Sigmoid": nn.Sigmoid}[layer_type](**cfg)


def _kaiming_init(module: nn.Module, a: float = 0, mode: str = "fan_out", nonlinearity: str = "relu",
                  bias: float = 0) -> None:
    nn.init.kaiming_normal_(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


class ConvModule(nn.Module):
    """mmcv ``ConvModule``: conv / norm / activation bundle.

    Attributes are ``conv``, the norm under its abbreviation (``bn`` for BN,
    exposed through the ``norm`` property) and ``activate``.  ``bias='auto'``
    means the conv has a bias only when there is no norm layer.
    """

    _abbr_ = "conv_block"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias="auto",
        conv_cfg: Optional[Dict] = None,
        norm_cfg: Optional[Dict] = None,
        act_cfg: Optional[Dict] = dict(type="ReLU"),
        inplace: bool = True,
        order: Tuple[str, str, str] = ("conv", "norm", "act"),
    ):
        super().__init__()
        assert conv_cfg is None or conv_cfg.get("type", "Conv") in ("Conv", "Conv2d")
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.inplace = inplace
        self.order = order
        self.with_norm = norm_cfg is not None
        self.with_activation = act_cfg is not None
        if bias == "auto":
            bias = not self.with_norm
        self.with_bias = bias
        self.with_explicit_padding = False

        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.in_channels = self.conv.in_channels
        self.out_channels = self.conv.out_channels
        self.kernel_size = self.conv.kernel_size
        self.stride = self.conv.stride
        self.padding = self.conv.padding
        self.dilation = self.conv.dilation
        self.groups = self.conv.groups

        if self.with_norm:
            # norm layer is after conv layer
            if order.index("norm") > order.index("conv"):
                norm_channels = out_channels
            else:
                norm_channels = in_channels
            self.norm_name, norm = _build_norm(norm_cfg, norm_channels)
            self.add_module(self.norm_name, norm)
        else:
            self.norm_name = None

        if self.with_activation:
            act_cfg_ = dict(act_cfg)
            if act_cfg_["type"] not in ("Tanh", "PReLU", "Sigmoid", "HSigmoid", "Swish", "GELU"):
                act_cfg_.setdefault("inplace", inplace)
            self.activate = _build_activation(act_cfg_)

        self.init_weights()

    @property
    def norm(self):
        if self.norm_name:
            return getattr(self, self.norm_name)
        return None

    def init_weights(self):
        if self.with_activation and self.act_cfg["type"] == "LeakyReLU":
            nonlinearity = "leaky_relu"
            a = self.act_cfg.get("negative_slope", 0.01)
        else:
            nonlinearity = "relu"
            a = 0
        _kaiming_init(self.conv, a=a, nonlinearity=nonlinearity)
        if self.with_norm:
            nn.init.constant_(self.norm.weight, 1)
            nn.init.constant_(self.norm.bias, 0)

    def forward(self, x, activate: bool = True, norm: bool = True):
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and norm and self.with_norm:
                x = self.norm(x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
        return x


# --------------------------------------------------------------------------------------
# mmaction2 ResNet backbone
# --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="pytorch",
                 conv_cfg=dict(type="Conv"), norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"),
                 with_cp=False):
        super().__init__()
        assert style in ["pytorch", "caffe"]
        self.conv1 = ConvModule(inplanes, planes, kernel_size=3, stride=stride, padding=dilation,
                                dilation=dilation, bias=False, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                act_cfg=act_cfg)
        self.conv2 = ConvModule(planes, planes, kernel_size=3, stride=1, padding=1, dilation=1, bias=False,
                                conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=None)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.style = style
        self.stride = stride
        self.dilation = dilation
        self.norm_cfg = norm_cfg
        assert not with_cp
        self.with_cp = with_cp

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.conv2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out = out + identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="pytorch",
                 conv_cfg=dict(type="Conv"), norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU"),
                 with_cp=False):
        super().__init__()
        assert style in ["pytorch", "caffe"]
        self.inplanes = inplanes
        self.planes = planes
        if style == "pytorch":
            self.conv1_stride = 1
            self.conv2_stride = stride
        else:
            self.conv1_stride = stride
            self.conv2_stride = 1
        self.conv1 = ConvModule(inplanes, planes, kernel_size=1, stride=self.conv1_stride, bias=False,
                                conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.conv2 = ConvModule(planes, planes, kernel_size=3, stride=self.conv2_stride, padding=dilation,
                                dilation=dilation, bias=False, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                act_cfg=act_cfg)
        self.conv3 = ConvModule(planes, planes * self.expansion, kernel_size=1, bias=False, conv_cfg=conv_cfg,
                                norm_cfg=norm_cfg, act_cfg=None)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.norm_cfg = norm_cfg
        self.with_cp = with_cp

    def forward(self, x):
        def _inner_forward(x):
            identity = x

            out = self.conv1(x)
            out = self.conv2(out)
            out = self.conv3(out)

            if self.downsample is not None:
                identity = self.downsample(x)

            out = out + identity
            return out

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)

        out = self.relu(out)
        return out


def make_res_layer(block, inplanes, planes, blocks, stride=1, dilation=1, style="pytorch", norm_cfg=None,
                   act_cfg=None, conv_cfg=None, with_cp=False):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = ConvModule(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False,
                                conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=None)

    layers = []
    layers.append(block(inplanes, planes, stride, dilation, downsample, style=style, conv_cfg=conv_cfg,
                        norm_cfg=norm_cfg, act_cfg=act_cfg, with_cp=with_cp))
    inplanes = planes * block.expansion
    for _ in range(1, blocks):
        layers.append(block(inplanes, planes, 1, dilation, style=style, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                            act_cfg=act_cfg, with_cp=with_cp))

    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """mmaction2 ``ResNet`` backbone (stem ``conv1`` ConvModule + ``maxpool``,
    stages registered with ``add_module('layer{i}')`` and walked by name)."""

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
    }

    def __init__(self, depth=50, in_channels=3, num_stages=4, out_indices=(3,), strides=(1, 2, 2, 2),
                 dilations=(1, 1, 1, 1), style="pytorch", frozen_stages=-1, conv_cfg=dict(type="Conv"),
                 norm_cfg=dict(type="BN2d", requires_grad=True), act_cfg=dict(type="ReLU", inplace=True),
                 norm_eval=False, with_cp=False, base_channels=64, stage_blocks: Optional[Sequence[int]] = None):
        super().__init__()
        if depth not in self.arch_settings:
            raise KeyError(f"invalid depth {depth} for resnet")
        self.depth = depth
        self.in_channels = in_channels
        self.num_stages = num_stages
        self.out_indices = out_indices
        self.strides = strides
        self.dilations = dilations
        self.style = style
        self.frozen_stages = frozen_stages
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        self.block, default_blocks = self.arch_settings[depth]
        self.stage_blocks = tuple(stage_blocks) if stage_blocks is not None else default_blocks[:num_stages]
        self.inplanes = base_channels

        self._make_stem_layer()

        self.res_layers = []
        for i, num_blocks in enumerate(self.stage_blocks):
            stride = strides[i]
            dilation = dilations[i]
            planes = base_channels * 2**i
            res_layer = make_res_layer(self.block, self.inplanes, planes, num_blocks, stride=stride,
                                       dilation=dilation, style=self.style, norm_cfg=self.norm_cfg,
                                       conv_cfg=self.conv_cfg, act_cfg=self.act_cfg, with_cp=with_cp)
            self.inplanes = planes * self.block.expansion
            layer_name = f"layer{i + 1}"
            self.add_module(layer_name, res_layer)
            self.res_layers.append(layer_name)

        self.feat_dim = self.block.expansion * base_channels * 2 ** (len(self.stage_blocks) - 1)

    def _make_stem_layer(self):
        self.conv1 = ConvModule(self.in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False,
                                conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool(x)
        outs = []
        for i, layer_name in enumerate(self.res_layers):
            res_layer = getattr(self, layer_name)
            x = res_layer(x)
            if i in self.out_indices:
                outs.append(x)
        if len(outs) == 1:
            return outs[0]
        return tuple(outs)


# --------------------------------------------------------------------------------------
# TSN head + recognizer
# --------------------------------------------------------------------------------------
class CrossEntropyLoss(nn.Module):
    """Parameter-free loss module kept as an (unused in forward) child, as in mmaction2."""

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, cls_score, label):
        return F.cross_entropy(cls_score, label) * self.loss_weight


class AvgConsensus(nn.Module):
    """Average consensus module."""

    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(dim=self.dim, keepdim=True)


class TSNHead(nn.Module):
    def __init__(self, num_classes, in_channels, spatial_type="avg", consensus=dict(type="AvgConsensus", dim=1),
                 dropout_ratio=0.4, init_std=0.01):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.loss_cls = CrossEntropyLoss()
        self.spatial_type = spatial_type
        self.dropout_ratio = dropout_ratio
        self.init_std = init_std

        consensus_ = dict(consensus)
        consensus_type = consensus_.pop("type")
        if consensus_type == "AvgConsensus":
            self.consensus = AvgConsensus(**consensus_)
        else:
            self.consensus = None

        if self.spatial_type == "avg":
            # use `nn.AdaptiveAvgPool2d` to adaptively match the in_channels.
            self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        else:
            self.avg_pool = None

        if self.dropout_ratio != 0:
            self.dropout = nn.Dropout(p=self.dropout_ratio)
        else:
            self.dropout = None
        self.fc_cls = nn.Linear(self.in_channels, self.num_classes)
        self.init_weights()

    def init_weights(self):
        nn.init.normal_(self.fc_cls.weight, 0, self.init_std)
        nn.init.constant_(self.fc_cls.bias, 0)

    def forward(self, x, num_segs):
        # [N * num_segs, in_channels, 7, 7]
        if self.avg_pool is not None:
            x = self.avg_pool(x)
        # [N * num_segs, in_channels, 1, 1]
        x = x.reshape((-1, num_segs) + x.shape[1:])
        # [N, num_segs, in_channels, 1, 1]
        x = self.consensus(x)
        # [N, 1, in_channels, 1, 1]
        x = x.squeeze(1)
        # [N, in_channels, 1, 1]
        if self.dropout is not None:
            x = self.dropout(x)
            # [N, in_channels, 1, 1]
        x = x.view(x.size(0), -1)
        # [N, in_channels]
        cls_score = self.fc_cls(x)
        # [N, num_classes]
        return cls_score


class Recognizer2D(nn.Module):
    """TSN recognizer: ``backbone`` + ``cls_head``.  ``forward`` takes the clip
    batch already flattened to ``(N * num_segs, C, H, W)``."""

    def __init__(self, backbone: nn.Module, cls_head: nn.Module, num_segs: int = 3):
        super().__init__()
        self.backbone = backbone
        self.cls_head = cls_head
        self.num_segs = num_segs

    def extract_feat(self, imgs):
        return self.backbone(imgs)

    def forward(self, imgs):
        x = self.extract_feat(imgs)
        cls_score = self.cls_head(x, self.num_segs)
        return cls_score


def tsn_r50(num_classes: int = 101, num_segs: int = 3, base_channels: int = 64,
            stage_blocks: Optional[Sequence[int]] = None, depth: int = 50, dropout_ratio: float = 0.4) -> Recognizer2D:
    """TSN with an mmaction2 ResNet-50 backbone (UCF-101 head by default).

    ``base_channels`` scales width (64 = real), ``stage_blocks`` overrides the
    number of Bottlenecks per stage (default (3, 4, 6, 3)).
    """
    backbone = ResNet(depth=depth, base_channels=base_channels, stage_blocks=stage_blocks)
    head = TSNHead(num_classes=num_classes, in_channels=backbone.feat_dim, dropout_ratio=dropout_ratio)
    return Recognizer2D(backbone, head, num_segs=num_segs)
