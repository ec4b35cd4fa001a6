"""Generators and discriminators, key-for-key compatible with pytorch-CycleGAN-and-pix2pix.

The module trees below reproduce ``models/networks.py`` of
`pytorch-CycleGAN-and-pix2pix <https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix>`_ layer by
layer, so that a ``state_dict`` saved by that project (``latest_net_G.pth``,
``latest_net_G_A.pth``) loads with ``strict=True`` and gives the same output:

* :class:`ResnetGenerator` -- ``model`` is one ``nn.Sequential``: ``ReflectionPad2d(3)``,
  ``Conv2d(3, ngf, 7)``, norm, ReLU; two stride-2 ``Conv2d(k=3, p=1)`` + norm + ReLU; ``n_blocks``
  :class:`ResnetBlock` (``conv_block`` = ReflPad1, Conv3, norm, ReLU, [Dropout 0.5], ReflPad1,
  Conv3, norm, with a skip); two ``ConvTranspose2d(k=3, s=2, p=1, output_padding=1)`` + norm +
  ReLU; ``ReflectionPad2d(3)``, ``Conv2d(ngf, 3, 7)``, Tanh. Parameter-free layers take index
  slots, so ``resnet_9blocks`` ends in ``model.26`` and dropout moves the second block conv from
  ``conv_block.5`` to ``conv_block.6``. Convs carry a bias only with instance norm (the last
  Conv7 always has one). With instance norm and 9 blocks: 48 tensors, 11,378,179 parameters.
* :class:`UnetGenerator` -- nested :class:`UnetSkipConnectionBlock` (``model.model.1.model.3...``);
  ``unet_128`` has 7 downsamplings (input sides divisible by 128), ``unet_256`` 8 (by 256).
* :class:`NLayerDiscriminator` -- the 70x70 PatchGAN (``basic``, ``n_layers=3``).

Norms: ``"instance"`` is ``InstanceNorm2d(affine=False, track_running_stats=False)`` (no
tensors), ``"batch"`` is ``BatchNorm2d(affine=True, track_running_stats=True)`` (5 tensors per
layer), ``"none"`` an identity (and, as in the reference, convs *without* bias).

torch is imported by this module: import it only from code that needs a network.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ARCHS",
    "NORMS",
    "Identity",
    "ResnetBlock",
    "ResnetGenerator",
    "UnetSkipConnectionBlock",
    "UnetGenerator",
    "NLayerDiscriminator",
    "get_norm_layer",
    "define_G",
    "define_D",
    "init_weights",
    "resnet_blocks",
    "receptive_field",
    "size_multiple",
    "count_params",
]

#: Generator architectures by name (``--netG`` of the reference project) plus ``resnet_<n>blocks``.
ARCHS = ("resnet_9blocks", "resnet_6blocks", "unet_128", "unet_256")
#: Normalisation layers (``--norm``).
NORMS = ("instance", "batch", "none")

_RESNET = re.compile(r"^resnet_(\d+)blocks$")


class Identity(nn.Module):
    """Pass-through (the reference's ``norm='none'``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def get_norm_layer(norm_type: str = "instance") -> Callable[[int], nn.Module]:
    """Return the norm-layer factory of the reference project for ``norm_type``."""
    if norm_type == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm_type == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm_type == "none":
        def norm_layer(_c: int) -> nn.Module:
            return Identity()

        return norm_layer
    raise ValueError(f"norm {norm_type!r} is not one of {NORMS}")


def _uses_bias(norm_layer: Callable[[int], nn.Module]) -> bool:
    # the reference: bias only when the norm is InstanceNorm2d (not for 'none')
    if isinstance(norm_layer, functools.partial):
        return norm_layer.func is nn.InstanceNorm2d
    return norm_layer is nn.InstanceNorm2d


class ResnetBlock(nn.Module):
    """Residual block ``x + conv_block(x)`` of the reference's ResnetGenerator."""

    def __init__(
        self,
        dim: int,
        padding_type: str,
        norm_layer: Callable[[int], nn.Module],
        use_dropout: bool,
        use_bias: bool,
    ) -> None:
        super().__init__()
        self.conv_block = self.build_conv_block(dim, padding_type, norm_layer, use_dropout, use_bias)

    @staticmethod
    def _pad(padding_type: str) -> tuple[list[nn.Module], int]:
        if padding_type == "reflect":
            return [nn.ReflectionPad2d(1)], 0
        if padding_type == "replicate":
            return [nn.ReplicationPad2d(1)], 0
        if padding_type == "zero":
            return [], 1
        raise ValueError(f"padding {padding_type!r} is not implemented")

    def build_conv_block(self, dim, padding_type, norm_layer, use_dropout, use_bias) -> nn.Sequential:
        pad, p = self._pad(padding_type)
        block: list[nn.Module] = [*pad, nn.Conv2d(dim, dim, 3, padding=p, bias=use_bias),
                                  norm_layer(dim), nn.ReLU(True)]
        if use_dropout:
            block.append(nn.Dropout(0.5))
        pad, p = self._pad(padding_type)
        block += [*pad, nn.Conv2d(dim, dim, 3, padding=p, bias=use_bias), norm_layer(dim)]
        return nn.Sequential(*block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """ResNet generator (Johnson et al.), as ``--netG resnet_<n>blocks`` builds it."""

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 64,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        use_dropout: bool = False,
        n_blocks: int = 6,
        padding_type: str = "reflect",
    ) -> None:
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        super().__init__()
        use_bias = _uses_bias(norm_layer)
        model: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        n_down = 2
        for i in range(n_down):
            mult = 2**i
            model += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                norm_layer(ngf * mult * 2),
                nn.ReLU(True),
            ]
        mult = 2**n_down
        for _ in range(n_blocks):
            model.append(ResnetBlock(ngf * mult, padding_type, norm_layer, use_dropout, use_bias))
        for i in range(n_down):
            mult = 2 ** (n_down - i)
            model += [
                nn.ConvTranspose2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=2,
                                   padding=1, output_padding=1, bias=use_bias),
                norm_layer(int(ngf * mult / 2)),
                nn.ReLU(True),
            ]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetSkipConnectionBlock(nn.Module):
    """One level of the U-Net: ``x -> [down, submodule, up]`` with a skip connection."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        use_bias = _uses_bias(norm_layer)
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = norm_layer(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1,
                                        bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1,
                                        bias=use_bias)
            model = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """U-Net generator with ``num_downs`` downsamplings (``unet_128``: 7, ``unet_256``: 8)."""

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        use_dropout: bool = False,
    ) -> None:
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        super().__init__()
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=None, norm_layer=norm_layer,
                                        innermost=True)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer,
                                            use_dropout=use_dropout)
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block,
                                             outermost=True, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (``--netD basic`` is ``n_layers=3``: 70x70 patches)."""

    def __init__(
        self,
        input_nc: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        use_bias = _uses_bias(norm_layer)
        kw, padw = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, 2, padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 2, padw, bias=use_bias),
                    norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, 1, padw, bias=use_bias),
                norm_layer(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, kw, 1, padw)]
        self.model = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def resnet_blocks(arch: str) -> int | None:
    """Number of residual blocks of ``resnet_<n>blocks``, or None for another architecture."""
    m = _RESNET.match(arch)
    return int(m.group(1)) if m else None


def define_G(
    arch: str = "resnet_9blocks",
    ngf: int = 64,
    norm: str = "instance",
    use_dropout: bool = False,
    input_nc: int = 3,
    output_nc: int = 3,
    padding_type: str = "reflect",
) -> nn.Module:
    """Build a generator as the reference's ``networks.define_G`` does (without weight init).

    ``arch`` is ``resnet_9blocks``, ``resnet_6blocks`` (any ``resnet_<n>blocks``), ``unet_128`` or
    ``unet_256``.
    """
    norm_layer = get_norm_layer(norm)
    n = resnet_blocks(arch)
    if n is not None:
        return ResnetGenerator(input_nc, output_nc, ngf, norm_layer, use_dropout, n, padding_type)
    if arch == "unet_128":
        return UnetGenerator(input_nc, output_nc, 7, ngf, norm_layer, use_dropout)
    if arch == "unet_256":
        return UnetGenerator(input_nc, output_nc, 8, ngf, norm_layer, use_dropout)
    raise ValueError(f"generator {arch!r} is not one of {ARCHS} (or resnet_<n>blocks)")


def define_D(input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> nn.Module:
    """PatchGAN discriminator as ``networks.define_D(netD='basic' | 'n_layers')`` builds it."""
    return NLayerDiscriminator(input_nc, ndf, n_layers, get_norm_layer(norm))


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """Initialise weights as the reference does (``normal``/``xavier``/``kaiming``/``orthogonal``)."""

    def f(m: nn.Module) -> None:
        name = m.__class__.__name__
        if hasattr(m, "weight") and m.weight is not None and ("Conv" in name or "Linear" in name):
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, init_gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=init_gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                nn.init.orthogonal_(m.weight, gain=init_gain)
            else:
                raise ValueError(f"init_type {init_type!r} is not implemented")
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias, 0.0)
        elif "BatchNorm2d" in name and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, init_gain)
            nn.init.constant_(m.bias, 0.0)

    net.apply(f)
    return net


def receptive_field(arch: str) -> int:
    """Receptive field (pixels, one side to the other) of a generator's output pixel.

    ResNet generators: ``7 + 2 + 4`` (stem and downsamplings) ``+ 16 n_blocks`` (two 3x3 convs at
    stride 4) ``+ 8 + 4`` (transposed convs, upper bound) ``+ 6`` (last Conv7) ``= 31 + 16 n`` --
    175 px for 9 blocks, 127 for 6. U-Nets see their whole input window.
    """
    n = resnet_blocks(arch)
    if n is not None:
        return 31 + 16 * n
    if arch == "unet_128":
        return 128
    if arch == "unet_256":
        return 256
    raise ValueError(f"generator {arch!r} is not one of {ARCHS} (or resnet_<n>blocks)")


def size_multiple(arch: str) -> int:
    """Input sides must be multiples of this (4 for ResNets, 128/256 for U-Nets)."""
    if resnet_blocks(arch) is not None:
        return 4
    return {"unet_128": 128, "unet_256": 256}[arch]


def count_params(net: nn.Module) -> int:
    """Number of parameters (what the reference prints as ``Total number of parameters``)."""
    return sum(p.numel() for p in net.parameters())
