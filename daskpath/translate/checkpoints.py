"""Generator checkpoints: pytorch-CycleGAN-and-pix2pix ``.pth`` files and model folders.

A **model folder** holds the weights in the reference project's format plus a JSON spec beside
them (``daskpath.json``)::

    translator_phantom/
        latest_net_G.pth      # plain state_dict, as the reference saves it
        daskpath.json         # {"arch": "resnet_6blocks", "ngf": 16, "norm": "instance", ...}

:func:`load_generator` accepts a folder, a ``.pth`` file, or the name of a model shipped in the
package (:data:`SHIPPED_MODELS`). In a folder it picks, in order: the file the spec names
(``"weights"``), ``latest_net_G.pth``, ``latest_net_G_A.pth``, then the highest
``<epoch>_net_G(_A).pth``. Checkpoint handling follows the reference's ``load_networks``:

* ``torch.load(..., weights_only=True)`` (no pickled code runs);
* a ``module.`` prefix (``DataParallel`` forks) is removed;
* ``running_mean`` / ``running_var`` / ``num_batches_tracked`` that old PyTorch versions saved
  for ``InstanceNorm2d`` layers are dropped;
* then ``load_state_dict(strict=True)``: any missing, unexpected or mis-shaped tensor is a
  :class:`~daskpath.errors.ModelError` naming the file and the likely spec fix.

Without a spec the architecture is inferred from the keys (ResNet block count, U-Net depth,
``ngf``, instance/batch norm, dropout), so a bare ``latest_net_G_A.pth`` loads too.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daskpath.errors import ModelError, ModelNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "SPEC_NAME",
    "SHIPPED_MODELS",
    "GeneratorSpec",
    "find_weights",
    "read_spec",
    "infer_spec",
    "clean_state_dict",
    "load_state_dict_file",
    "load_generator",
    "save_generator",
    "build_generator",
]

#: File name of the JSON spec inside a model folder.
SPEC_NAME = "daskpath.json"
#: Models shipped inside the package: name -> folder.
SHIPPED_MODELS = {"phantom": Path(__file__).resolve().parent.parent / "models" / "translator_phantom"}

_EPOCH_FILE = re.compile(r"^(\d+)_net_G(_A)?\.pth$")


@dataclass(frozen=True)
class GeneratorSpec:
    """What is needed to rebuild a generator and run it on slides (the JSON spec).

    Attributes
    ----------
    arch : str
        ``resnet_9blocks``, ``resnet_6blocks`` (any ``resnet_<n>blocks``), ``unet_128``, ``unet_256``.
    ngf : int
        Filters in the first conv layer.
    norm : {"instance", "batch", "none"}
        Normalisation layers.
    dropout : bool
        ``--no_dropout`` not given (dropout layers present; they shift ResNet keys).
    input_nc, output_nc : int
        Channels in and out (3 and 3 for H&E -> IHC).
    padding_type : str
        ResNet block padding (``reflect`` in the reference).
    input_mean, input_std : tuple of float
        Input normalisation ``(x / 255 - mean) / std`` per channel; the reference's
        ``Normalize((0.5,)*3, (0.5,)*3)`` maps [0, 1] to [-1, 1]. Output is ``(y + 1) / 2 * 255``.
    tile : int
        Inference window side in pixels (a multiple of the architecture's size multiple).
    halo : int
        Context margin per side kept around every window's output core; at least half the
        receptive field for seam-free output (88 for ``resnet_9blocks``).
    direction : str
        ``"AtoB"`` (H&E -> IHC) or ``"BtoA"``; informative.
    weights : str or None
        File name of the weights inside the folder (default: found by name).
    extra : dict
        Free-form provenance (training command, data, figures).
    """

    arch: str = "resnet_9blocks"
    ngf: int = 64
    norm: str = "instance"
    dropout: bool = False
    input_nc: int = 3
    output_nc: int = 3
    padding_type: str = "reflect"
    input_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    input_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tile: int = 512
    halo: int | None = None
    direction: str = "AtoB"
    weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        from daskpath.translate.networks import ARCHS, NORMS, resnet_blocks

        if resnet_blocks(self.arch) is None and self.arch not in ARCHS:
            raise ModelError(f"spec: arch={self.arch!r} is unknown; use one of {', '.join(ARCHS)}")
        if self.norm not in NORMS:
            raise ModelError(f"spec: norm={self.norm!r} is unknown; use one of {', '.join(NORMS)}")
        if not (isinstance(self.ngf, int) and self.ngf > 0):
            raise ModelError(f"spec: ngf={self.ngf!r} must be a positive integer")
        object.__setattr__(self, "input_mean", tuple(float(v) for v in self.input_mean))
        object.__setattr__(self, "input_std", tuple(float(v) for v in self.input_std))
        m = self.multiple
        if not (isinstance(self.tile, int) and self.tile >= m and self.tile % m == 0):
            raise ModelError(f"spec: tile={self.tile!r} must be a positive multiple of {m} for {self.arch}")
        if self.halo is None:
            object.__setattr__(self, "halo", self.default_halo)
        if not (isinstance(self.halo, int) and 0 <= 2 * self.halo < self.tile):
            raise ModelError(f"spec: halo={self.halo!r} must be an integer in [0, tile/2) (tile={self.tile})")

    @property
    def multiple(self) -> int:
        """Window sides must be multiples of this (total stride of the network)."""
        from daskpath.translate.networks import size_multiple

        return size_multiple(self.arch)

    @property
    def receptive_field(self) -> int:
        """Receptive field of one output pixel, in pixels."""
        from daskpath.translate.networks import receptive_field

        return receptive_field(self.arch)

    @property
    def default_halo(self) -> int:
        """Half the receptive field rounded up to a multiple of 4 (ResNets), tile/8 for U-Nets."""
        from daskpath.translate.networks import resnet_blocks

        if resnet_blocks(self.arch) is not None:
            return -(-(self.receptive_field // 2 + 1) // 4) * 4
        return max(16, self.tile // 8)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_mean"], d["input_std"] = list(self.input_mean), list(self.input_std)
        d["receptive_field"] = self.receptive_field
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "spec") -> GeneratorSpec:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"receptive_field", "format", "name"})
        if unknown:
            raise ModelError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
        kw = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kw)
        except ModelError as e:
            raise ModelError(f"{source}: {e}") from None
        except TypeError as e:
            raise ModelError(f"{source}: {e}") from None


def _shipped(model: str | Path) -> Path | None:
    if isinstance(model, str) and model in SHIPPED_MODELS:
        return SHIPPED_MODELS[model]
    return None


def _inside(path: Path, folder: Path) -> bool:
    """``path`` resolves (links followed) to somewhere under ``folder``."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def find_weights(folder: Path, spec: GeneratorSpec | None = None) -> Path:
    """The generator weights in a model folder (see the module docstring for the order)."""
    if spec is not None and spec.weights:
        p = folder / spec.weights
        if not _inside(p, folder):
            raise ModelError(f"{folder / SPEC_NAME}: weights {spec.weights!r} points outside the "
                             f"model folder; name a file inside {folder}")
        if not p.is_file():
            raise ModelNotFoundError(f"{folder / SPEC_NAME}: weights {spec.weights!r} not found in "
                                     f"{folder}; fix the 'weights' key or restore the file")
        return p
    for name in ("latest_net_G.pth", "latest_net_G_A.pth"):
        if (folder / name).is_file():
            return folder / name
    epochs = []
    for p in folder.glob("*_net_G*.pth"):
        m = _EPOCH_FILE.match(p.name)
        if m:
            epochs.append((int(m.group(1)), m.group(2) is None, p))
    if epochs:
        return max(epochs)[2]
    raise ModelNotFoundError(f"{folder}: no generator weights (latest_net_G.pth, latest_net_G_A.pth "
                             "or <epoch>_net_G_A.pth); point to a checkpoint folder or a .pth file")


def read_spec(folder: Path) -> GeneratorSpec | None:
    """The folder's ``daskpath.json`` as a :class:`GeneratorSpec`, or None if there is none."""
    p = folder / SPEC_NAME
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{p}: not valid JSON ({e}); fix or delete the spec") from None
    if not isinstance(d, dict):
        raise ModelError(f"{p}: must hold a JSON object; fix or delete the spec")
    return GeneratorSpec.from_json(d, source=str(p))


def clean_state_dict(sd: dict[str, Any], net: nn.Module | None = None) -> dict[str, Any]:
    """Undo what forks and old PyTorch versions add to a reference checkpoint.

    Strips ``module.`` prefixes and, where ``net`` has an ``InstanceNorm2d`` at that path (or,
    without ``net``, where the layer has no ``weight``), the ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` buffers that PyTorch < 0.4 saved for instance norm.
    """
    from torch import nn

    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    inorm = None
    if net is not None:
        inorm = {n for n, m in net.named_modules() if isinstance(m, nn.InstanceNorm2d)
                 and not m.track_running_stats}
    for k in list(out):
        layer, _, leaf = k.rpartition(".")
        if leaf not in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        if inorm is not None:
            if layer in inorm:
                del out[k]
        elif f"{layer}.weight" not in out:
            del out[k]
    return out


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with ModelErrors."""
    import torch

    if not path.is_file():
        raise ModelNotFoundError(f"{path}: checkpoint not found; check the path")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelError(f"{path}: not a PyTorch checkpoint ({msg}); point to a .pth state_dict "
                         "saved by pytorch-CycleGAN-and-pix2pix or daskpath") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ModelError(f"{path}: does not hold a state_dict (got {type(sd).__name__}); "
                         "save net.state_dict(), not the module")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path}: holds non-tensor entries; it is not a generator state_dict")
    return sd


def infer_spec(sd: dict[str, Any], **overrides: Any) -> GeneratorSpec:
    """Guess the architecture of a (cleaned) generator state_dict from its keys and shapes."""
    keys = set(sd)
    if "model.1.weight" in keys and sd["model.1.weight"].ndim == 4 and sd["model.1.weight"].shape[-1] == 7:
        w = sd["model.1.weight"]
        ngf, input_nc = int(w.shape[0]), int(w.shape[1])
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"^model\.(\d+)\.conv_block\.", k))}
        n_blocks = len(blocks)
        # dropout takes an index slot: the second conv moves from conv_block.5 to conv_block.6
        dropout = any(k.endswith(".conv_block.6.weight") and sd[k].ndim == 4 for k in keys)
        norm = "batch" if "model.2.running_mean" in keys else ("instance" if "model.1.bias" in keys else "none")
        last = max(int(m.group(1)) for k in keys if (m := re.match(r"^model\.(\d+)\.weight$", k)))
        output_nc = int(sd[f"model.{last}.weight"].shape[0])
        kw = dict(arch=f"resnet_{n_blocks}blocks", ngf=ngf, norm=norm, dropout=dropout,
                  input_nc=input_nc, output_nc=output_nc)
    elif "model.model.0.weight" in keys:
        w = sd["model.model.0.weight"]
        ngf, input_nc = int(w.shape[0]), int(w.shape[1])
        # each inner level nests one ".model.3." deeper; the innermost upconv adds one more
        inner = [k[len("model.model.1."):] for k in keys if k.startswith("model.model.1.")]
        num_downs = max(k.count("model.3.") for k in inner) + 1
        arch = {7: "unet_128", 8: "unet_256"}.get(num_downs)
        if arch is None:
            raise ModelError(f"U-Net with {num_downs} downsamplings is not unet_128 or unet_256")
        norm = "batch" if any(k.endswith("running_mean") for k in keys) else (
            "instance" if "model.model.0.bias" in keys else "none")
        # dropout appends a layer after upnorm; it takes no tensors, so look at the module depth
        dropout = bool(overrides.pop("dropout", False))
        output_nc = int(sd["model.model.3.weight"].shape[1])
        kw = dict(arch=arch, ngf=ngf, norm=norm, dropout=dropout, input_nc=input_nc, output_nc=output_nc)
    else:
        first = next(iter(sd), "<empty>")
        raise ModelError(f"state_dict with first key {first!r} is not a ResnetGenerator or "
                         "UnetGenerator of pytorch-CycleGAN-and-pix2pix")
    if kw["arch"].startswith("unet"):
        kw.setdefault("tile", 256)
    kw.update(overrides)
    return GeneratorSpec(**kw)


def build_generator(spec: GeneratorSpec) -> nn.Module:
    """An (uninitialised) generator for ``spec``."""
    from daskpath.translate.networks import define_G

    return define_G(spec.arch, spec.ngf, spec.norm, spec.dropout, spec.input_nc, spec.output_nc,
                    spec.padding_type)


def _resolve(model: str | Path) -> tuple[Path, Path | None]:
    """``(weights_file, folder_or_None)`` for a shipped name, a folder or a .pth file."""
    shipped = _shipped(model)
    p = shipped if shipped is not None else Path(model).expanduser()
    if p.is_dir():
        return p, p
    if p.is_file():
        return p, None
    if isinstance(model, str) and not any(c in model for c in "/\\") and not p.suffix:
        raise ModelNotFoundError(f"translate model {model!r} is neither a shipped model "
                                 f"({', '.join(SHIPPED_MODELS)}) nor an existing path; fix translate.model")
    raise ModelNotFoundError(f"{p}: model file or folder not found; check translate.model")


def load_generator(
    model: str | Path,
    spec: GeneratorSpec | None = None,
    *,
    device: str | torch.device = "cpu",
    eval: bool = True,
) -> tuple[nn.Module, GeneratorSpec]:
    """Load a generator from a folder, a ``.pth`` file or a shipped model name.

    Parameters
    ----------
    model : str or Path
        Model folder (weights + ``daskpath.json``), checkpoint file (``latest_net_G.pth``,
        ``latest_net_G_A.pth``, ``<epoch>_net_G_A.pth``), or a name in :data:`SHIPPED_MODELS`.
    spec : GeneratorSpec, optional
        Overrides the folder's spec; without either, the architecture is inferred from the keys.
    device : str or torch.device
        Where to put the network.
    eval : bool
        Put the network in eval mode (dropout off; batch norm uses its running statistics).

    Returns
    -------
    (torch.nn.Module, GeneratorSpec)

    Raises
    ------
    ModelError
        Missing file, not a checkpoint, or a state_dict that does not fit the architecture
        (strict load); the message names the file and the fix.
    """
    p, folder = _resolve(model)
    if folder is not None:
        if spec is None:
            spec = read_spec(folder)
        weights = find_weights(folder, spec)
    else:
        weights = p
        if spec is None and (p.parent / SPEC_NAME).is_file():
            spec = read_spec(p.parent)
    sd = load_state_dict_file(weights)
    if spec is None:
        spec = infer_spec(clean_state_dict(sd))
    net = build_generator(spec)
    sd = clean_state_dict(sd, net)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        expected, got = net.state_dict(), sd
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        shape = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
        detail = (f"{len(missing)} missing (e.g. {missing[0]!r})" if missing else
                  f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})" if unexpected else
                  f"shape mismatch at {shape[0]!r}" if shape else str(e).splitlines()[0][:120])
        raise ModelError(f"{weights}: does not fit {spec.arch} (ngf={spec.ngf}, norm={spec.norm}, "
                         f"dropout={spec.dropout}): {detail}; fix arch/ngf/norm/dropout in "
                         f"{SPEC_NAME} or use the matching checkpoint") from None
    net.to(device)
    net.train(not eval)
    for q in net.parameters():
        q.requires_grad_(False)
    return net, spec


def save_generator(net: nn.Module, folder: str | Path, spec: GeneratorSpec,
                   name: str = "latest_net_G.pth") -> Path:
    """Write ``net``'s state_dict (reference format, CPU tensors) and ``daskpath.json``."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    tmp = folder / (name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(folder / name)
    spec = replace(spec, weights=name)
    tmp = folder / (SPEC_NAME + ".tmp")
    tmp.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    tmp.replace(folder / SPEC_NAME)
    return folder
