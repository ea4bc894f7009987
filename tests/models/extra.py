"""More architectures than the seed-shaped zoo, to check qcast on model shapes it was not written against:
channel shuffle, fire modules, dense connectivity with unfoldable BN, squeeze-excite with SiLU / hardswish,
inception branches with asymmetric kernels, a UNet with ConvTranspose2d, an FPN detector with a dict output,
a CRNN with an LSTM, a 1-D conv net, GroupNorm/GELU/ELU, and a train-mode model holding QuantStubs.
Random weights, BN statistics randomized by the test. ``EXTRA`` maps a name to (factory, input shape).
"""
import torch, torch.nn as nn, torch.nn.functional as F

def conv_bn(i, o, k=3, s=1, g=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish) else act())

class ShuffleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        b = c // 2
        self.branch = nn.Sequential(nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                                    nn.Conv2d(b, b, 3, 1, 1, groups=b, bias=False), nn.BatchNorm2d(b),
                                    nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))
    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), dim=1)
        b, c, h, w = out.size()
        out = out.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return out

class ShuffleNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.blocks = nn.Sequential(*[ShuffleBlock(24) for _ in range(3)])
        self.head = nn.Linear(24, 10)
    def forward(self, x):
        x = self.blocks(self.pool(self.stem(x)))
        return self.head(x.mean([2, 3]))

class Fire(nn.Module):
    def __init__(self, i, s, e):
        super().__init__()
        self.squeeze = nn.Conv2d(i, s, 1); self.sa = nn.ReLU(inplace=True)
        self.e1 = nn.Conv2d(s, e, 1); self.e3 = nn.Conv2d(s, e, 3, padding=1); self.act = nn.ReLU(inplace=True)
    def forward(self, x):
        x = self.sa(self.squeeze(x))
        return torch.cat([self.act(self.e1(x)), self.act(self.e3(x))], 1)

class SqueezeNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(32, 8, 16), Fire(32, 8, 16), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(32, 16, 32))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(64, 10, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))
    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)

class DenseLayer(nn.Module):
    def __init__(self, i, g):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(i); self.relu1 = nn.ReLU(inplace=True); self.conv1 = nn.Conv2d(i, 4 * g, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * g); self.relu2 = nn.ReLU(inplace=True); self.conv2 = nn.Conv2d(4 * g, g, 3, padding=1, bias=False)
    def forward(self, feats):
        x = torch.cat(feats, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))

class DenseNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layers = nn.ModuleList([DenseLayer(16 + i * 8, 8) for i in range(4)])
        self.norm = nn.BatchNorm2d(48); self.fc = nn.Linear(48, 10)
    def forward(self, x):
        feats = [self.stem(x)]
        for l in self.layers:
            feats.append(l(feats))
        x = F.relu(self.norm(torch.cat(feats, 1)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1); self.fc2 = nn.Conv2d(c // r, c, 1)
    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * s

class MBConv(nn.Module):
    def __init__(self, i, o, e, s, act=nn.SiLU):
        super().__init__()
        h = i * e
        self.use_res = s == 1 and i == o
        self.block = nn.Sequential(conv_bn(i, h, 1, act=act), conv_bn(h, h, 3, s, g=h, act=act), SE(h), nn.Conv2d(h, o, 1, bias=False), nn.BatchNorm2d(o))
    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y

class EfficientNetish(nn.Module):
    def __init__(self, act=nn.SiLU):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=act)
        self.blocks = nn.Sequential(MBConv(16, 16, 1, 1, act), MBConv(16, 24, 4, 2, act), MBConv(24, 24, 4, 1, act))
        self.head = nn.Sequential(conv_bn(24, 64, 1, act=act), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10))
    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

class MobileNetV3ish(EfficientNetish):
    def __init__(self):
        super().__init__(act=nn.Hardswish)

class Inceptionish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.b1 = conv_bn(32, 16, 1)
        self.b2 = nn.Sequential(conv_bn(32, 16, 1), conv_bn(16, 24, 3))
        self.b3 = nn.Sequential(conv_bn(32, 8, 1), nn.Conv2d(8, 8, (1, 5), padding=(0, 2)), nn.Conv2d(8, 8, (5, 1), padding=(2, 0)))
        self.b4 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv_bn(32, 8, 1))
        self.fc = nn.Linear(56, 10)
    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))

class UNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.d1 = conv_bn(3, 16); self.d2 = conv_bn(16, 32, s=2); self.d3 = conv_bn(32, 64, s=2)
        self.up1 = nn.ConvTranspose2d(64, 32, 2, 2); self.c1 = conv_bn(64, 32)
        self.c2 = conv_bn(48, 16); self.out = nn.Conv2d(16, 2, 1)
    def forward(self, x):
        a = self.d1(x); b = self.d2(a); c = self.d3(b)
        u = self.c1(torch.cat([self.up1(c), b], 1))
        u = F.interpolate(u, scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(self.c2(torch.cat([u, a], 1)))

class FPNish(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = conv_bn(3, 16, s=2); self.c3 = conv_bn(16, 32, s=2); self.c4 = conv_bn(32, 64, s=2)
        self.l2 = nn.Conv2d(16, 32, 1); self.l3 = nn.Conv2d(32, 32, 1); self.l4 = nn.Conv2d(64, 32, 1)
        self.smooth = nn.Conv2d(32, 32, 3, padding=1)
        self.cls = nn.Conv2d(32, 6, 3, padding=1); self.box = nn.Conv2d(32, 4 * 3, 3, padding=1)
    def forward(self, x):
        c2 = self.c2(x); c3 = self.c3(c2); c4 = self.c4(c3)
        p4 = self.l4(c4)
        p3 = self.l3(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        p2 = self.l2(c2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        outs = []
        for p in (self.smooth(p2), p3, p4):
            n = p.shape[0]
            outs.append(torch.cat([self.cls(p).permute(0, 2, 3, 1).reshape(n, -1, 2), self.box(p).permute(0, 2, 3, 1).reshape(n, -1, 4)], -1))
        return {"preds": torch.cat(outs, 1), "scores": torch.cat(outs, 1)[..., :2].softmax(-1)}

class CRNNish(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(conv_bn(1, 16), nn.MaxPool2d(2), conv_bn(16, 32), nn.MaxPool2d((2, 1)), conv_bn(32, 32))
        self.rnn = nn.LSTM(32 * 8, 32, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(64, 20)
    def forward(self, x):
        f = self.cnn(x)  # n, 32, 8, w
        n, c, h, w = f.shape
        f = f.permute(0, 3, 1, 2).reshape(n, w, c * h)
        y, _ = self.rnn(f)
        return self.fc(y).log_softmax(-1)

class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 16, 9, 2, 4), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(16, 32, 9, 2, 4, dilation=1), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Conv1d(32, 32, 3, 1, 2, dilation=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.fc = nn.Linear(32, 5)
    def forward(self, x):
        return self.fc(self.net(x).squeeze(-1))

class GroupNormGELU(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1); self.gn = nn.GroupNorm(4, 16); self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16); self.fc = nn.Linear(16, 4)
    def forward(self, x):
        y = self.c2(F.gelu(self.gn(self.c1(x))))
        y = F.leaky_relu(y, 0.1) + F.elu(y)
        z = self.ln(y.mean((2, 3)))
        return self.fc(z)

class TrainModeStubs(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub(); self.dequant = torch.ao.quantization.DeQuantStub()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
        self.fc = nn.Linear(8, 3)
    def forward(self, x):
        x = self.body(self.quant(x))
        return self.dequant(self.fc(x.mean((2, 3))))

EXTRA = {
    "shufflenet": (ShuffleNetish, (2, 3, 64, 64)),
    "squeezenet": (SqueezeNetish, (2, 3, 64, 64)),
    "densenet": (DenseNetish, (2, 3, 64, 64)),
    "efficientnet": (EfficientNetish, (2, 3, 64, 64)),
    "mobilenetv3": (MobileNetV3ish, (2, 3, 64, 64)),
    "inception": (Inceptionish, (2, 3, 64, 64)),
    "unet": (UNetish, (2, 3, 64, 64)),
    "fpn": (FPNish, (2, 3, 64, 64)),
    "crnn": (CRNNish, (2, 1, 32, 48)),
    "conv1d": (Conv1dNet, (2, 1, 256)),
    "gn_gelu": (GroupNormGELU, (2, 3, 32, 32)),
    "stubs_train": (TrainModeStubs, (2, 3, 32, 32)),
}
