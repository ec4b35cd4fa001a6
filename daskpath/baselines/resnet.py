"""ResNet18 in plain torch, with torchvision's module names (no torchvision needed).

The state dict has exactly torchvision's ``resnet18`` keys and shapes (``conv1``, ``bn1``,
``layer1.0.conv1`` ... ``layer4.1.bn2``, ``layer2.0.downsample.0/1`` ..., ``fc``): 122 entries
with ``num_batches_tracked``; at ``width=64`` and 1000 classes, 11,689,512 parameters. An
ImageNet checkpoint (``resnet18-f37072fd.pth``) therefore loads with ``strict=True`` into
``resnet18(num_classes=1000)``, and :func:`load_torchvision_weights` loads its backbone into a
3-class net (new ``fc``).

``width`` scales every layer's channels (``width, 2 width, 4 width, 8 width``; torchvision's is
64); a smaller width keeps the keys and shrinks the tensors (the shipped phantom model uses 16).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from daskpath.errors import InvalidInputError, ModelError, ModelNotFoundError

__all__ = ["BasicBlock", "ResNet", "resnet18", "torchvision_resnet18_layout", "load_torchvision_weights"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs with batch norm and an identity/1x1 shortcut."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout for basic blocks (ResNet18/34)."""

    def __init__(self, layers: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__()
        if not (isinstance(width, int) and width >= 1):
            raise ModelError(f"resnet: width={width!r} must be a positive integer (torchvision: 64)")
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ModelError(f"resnet: num_classes={num_classes!r} must be a positive integer")
        self.width = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = width
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled ``(n, 8 width)`` features before ``fc``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet18 (2, 2, 2, 2 basic blocks) with torchvision's keys.

    Parameters
    ----------
    num_classes : int
        Outputs of ``fc`` (1000 for ImageNet checkpoints, 3 for the Ki67 classes).
    width : int
        Channels of the stem and ``layer1`` (torchvision: 64); later layers double it.
    """
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width)


def torchvision_resnet18_layout(num_classes: int = 1000, width: int = 64) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's ``resnet18().state_dict()`` (scaled by ``width``)."""
    out: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{k}"] = (c,)
        out[f"{name}.num_batches_tracked"] = ()

    out["conv1.weight"] = (width, 3, 7, 7)
    bn("bn1", width)
    cin = width
    for i in range(4):
        cout = width * 2**i
        for b in range(2):
            p = f"layer{i + 1}.{b}"
            c_in = cin if b == 0 else cout
            out[f"{p}.conv1.weight"] = (cout, c_in, 3, 3)
            bn(f"{p}.bn1", cout)
            out[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            bn(f"{p}.bn2", cout)
            if b == 0 and i > 0:
                out[f"{p}.downsample.0.weight"] = (cout, c_in, 1, 1)
                bn(f"{p}.downsample.1", cout)
        cin = cout
    out["fc.weight"] = (num_classes, cin)
    out["fc.bias"] = (num_classes,)
    return out


def load_torchvision_weights(net: ResNet, checkpoint: str | os.PathLike[str] | dict[str, Any], *,
                             head: str = "replace") -> ResNet:
    """Load a torchvision ResNet18 checkpoint (e.g. ``resnet18-f37072fd.pth``) into ``net``.

    Parameters
    ----------
    net : ResNet
        Target network (its width must match the checkpoint's).
    checkpoint : path-like or dict
        A ``.pth`` state dict (read with ``weights_only=True``: no code runs) or the dict itself.
    head : {"replace", "keep"}
        ``"replace"``: load every key but ``fc.*`` strictly and keep ``net``'s own ``fc`` (e.g. a
        new 3-class head); ``"keep"``: a strict load of everything (``fc`` shapes must match).

    Raises
    ------
    ModelError
        Missing, unexpected or mis-shaped tensors (names the first one and the likely fix).
    """
    if isinstance(checkpoint, dict):
        sd, src = checkpoint, "state dict"
    else:
        src = str(checkpoint)
        try:
            sd = torch.load(src, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{src}: no such checkpoint; give the path of a torchvision resnet18 .pth") from None
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{src}: not a readable torch checkpoint ({type(e).__name__}); "
                             "give a torchvision resnet18 state dict") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if head not in ("replace", "keep"):
        raise InvalidInputError(f"load_torchvision_weights: head={head!r}; use 'replace' or 'keep'")
    own = net.state_dict()
    if head == "replace":
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        sd.update({k: v for k, v in own.items() if k.startswith("fc.")})
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        k = (missing or unexpected)[0]
        what = "missing" if missing else "unexpected"
        raise ModelError(f"{src}: {what} key {k!r}; not a torchvision resnet18 state dict")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelError(f"{src}: {k} has shape {tuple(sd[k].shape)}, the net {tuple(v.shape)}; "
                             f"use width={int(sd['conv1.weight'].shape[0])} for this checkpoint")
    net.load_state_dict(sd, strict=True)
    return net
