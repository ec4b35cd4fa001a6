"""Colour deconvolution of brightfield IHC / H&E images (hematoxylin, DAB) over dask arrays.

Units
-----
Everything here works in **optical density (OD), base-10**, the unit QuPath and most of the
literature use: for an 8-bit pixel value ``I`` the OD of a channel is ``-log10(max(I, 1) / 255)``
(float images in [0, 1] use ``-log10(max(I, 1/255))``). Stain *concentrations* (what
:func:`deconvolve` returns) are the coefficients ``c`` in ``OD = c @ rgb_from_stain``, where the
rows of ``rgb_from_stain`` are the unit-free stain vectors. With skimage's HED vectors these are
exactly ``6 * skimage.color.rgb2hed(rgb)`` when ``rgb`` has no pure-black pixels (skimage divides
natural logarithms by ``log(1e-6)``, i.e. scales base-10 OD by 1/6), clipped at 0 like skimage.

Colour deconvolution is a per-pixel operation, so the dask wrappers use ``map_blocks`` with no halo
and results do not depend on the chunking.

Stain vectors are skimage's HED vectors (Ruifrok & Johnston 2001) by default. A custom matrix can
be given (rows = stain OD vectors, 2 or 3 rows; a missing third row is completed by the cross
product, as skimage and QuPath do), or estimated per slide with
:func:`estimate_stain_vectors_macenko` from a sample of tissue pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskpath.errors import InvalidInputError

__all__ = [
    "StainMatrix",
    "HED",
    "as_stain_matrix",
    "optical_density",
    "deconvolve",
    "deconvolve_dask",
    "hematoxylin_dab",
    "reconstruct_rgb",
    "estimate_stain_vectors_macenko",
    "sample_blocks",
    "sample_pixels",
]

log = logging.getLogger(__name__)

#: skimage.color.rgb_from_hed (rows: hematoxylin, eosin, DAB OD vectors).
_SKIMAGE_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)

# OD of the darkest representable 8-bit value: -log10(1/255).
_OD_MAX = float(-np.log10(1.0 / 255.0))


@dataclass(frozen=True)
class StainMatrix:
    """Stain OD vectors and their inverse.

    Attributes
    ----------
    rgb_from_stain : ndarray (3, 3)
        Row ``i`` is the OD vector (R, G, B) of stain ``i``.
    names : tuple of str
        Stain names in row order, e.g. ``("hematoxylin", "eosin", "dab")``.
    source : str
        Where the vectors come from (``"skimage-hed"``, ``"custom"``, ``"macenko"``).
    info : dict
        Extra provenance (sample size, angles, ...), JSON-serialisable.
    """

    rgb_from_stain: np.ndarray
    names: tuple[str, str, str] = ("hematoxylin", "eosin", "dab")
    source: str = "skimage-hed"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def stain_from_rgb(self) -> np.ndarray:
        """Inverse matrix: ``concentrations = OD @ stain_from_rgb``."""
        return np.linalg.inv(self.rgb_from_stain)

    def index(self, name: str) -> int:
        """Row index of stain ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise InvalidInputError(
                f"stain {name!r} is not in the stain matrix (stains: {', '.join(self.names)})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (for reports and ``metrics.json``)."""
        return {
            "source": self.source,
            "names": list(self.names),
            "rgb_from_stain": np.round(self.rgb_from_stain, 6).tolist(),
            **({"info": self.info} if self.info else {}),
        }


#: skimage's HED stain matrix (the default everywhere in daskpath).
HED = StainMatrix(_SKIMAGE_RGB_FROM_HED.copy(), ("hematoxylin", "eosin", "dab"), "skimage-hed")


def _complete(rows: np.ndarray) -> np.ndarray:
    """Normalise 2 or 3 OD vectors and complete a missing third by the cross product."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != 3 or rows.shape[0] not in (2, 3):
        raise InvalidInputError(
            f"stain matrix must have 2 or 3 rows of 3 OD values (R, G, B), got shape {rows.shape}"
        )
    if not np.all(np.isfinite(rows)) or np.any(np.linalg.norm(rows, axis=1) == 0):
        raise InvalidInputError("stain matrix rows must be finite, non-zero OD vectors")
    if rows.shape[0] == 2:
        third = np.cross(rows[0], rows[1])
        rows = np.vstack([rows, third])
    if abs(np.linalg.det(rows)) < 1e-8:
        raise InvalidInputError("stain matrix is singular: give linearly independent stain vectors")
    return rows


def as_stain_matrix(stain_matrix: StainMatrix | np.ndarray | list | None = None) -> StainMatrix:
    """Coerce ``None`` (skimage HED), a (2|3, 3) array of OD rows, or a StainMatrix.

    A custom array is interpreted as hematoxylin, DAB[, residual] rows (the IHC convention).
    """
    if stain_matrix is None:
        return HED
    if isinstance(stain_matrix, StainMatrix):
        return stain_matrix
    arr = np.asarray(stain_matrix, dtype=np.float64)
    names = ("hematoxylin", "dab", "residual")
    return StainMatrix(_complete(arr), names, "custom")


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Base-10 optical density of an RGB image, float32, shape ``(..., 3)``.

    ``uint8``: ``-log10(max(I, 1) / 255)``; float input is taken as [0, 1] and clipped at 1/255,
    so both give the same values for the same image.
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise InvalidInputError(
            f"expected an RGB image with a last axis of 3, got shape {rgb.shape}")
    if rgb.dtype == np.uint8:
        lut = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)
        return lut[rgb]
    x = np.clip(rgb.astype(np.float32, copy=False), 1.0 / 255.0, 1.0)
    return -np.log10(x)


def deconvolve(rgb: np.ndarray, stain_matrix: StainMatrix | np.ndarray | None = None) -> np.ndarray:
    """Stain concentrations (OD, float32, clipped at 0) of an RGB block, shape ``(..., 3)``."""
    sm = as_stain_matrix(stain_matrix)
    od = optical_density(rgb)
    out = od @ sm.stain_from_rgb.astype(np.float32)
    np.maximum(out, 0, out=out)
    return out.astype(np.float32, copy=False)


def _rgb_chunks(rgb):
    import dask.array as da

    if not isinstance(rgb, da.Array):
        rgb = da.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InvalidInputError(f"expected a (y, x, 3) RGB array, got shape {rgb.shape}")
    if len(rgb.chunks[-1]) != 1:
        rgb = rgb.rechunk({2: 3})
    return rgb


def deconvolve_dask(rgb, stain_matrix: StainMatrix | np.ndarray | None = None):
    """Lazy :func:`deconvolve` over a ``(y, x, 3)`` dask array (``map_blocks``, no halo).

    Returns a float32 ``(y, x, 3)`` dask array with the spatial chunks of ``rgb``; channel order is
    ``stain_matrix.names``.
    """
    sm = as_stain_matrix(stain_matrix)
    rgb = _rgb_chunks(rgb)
    return rgb.map_blocks(
        deconvolve, sm, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32)
    )


def _stains(rgb: np.ndarray, sm: StainMatrix, idx: tuple[int, ...]) -> np.ndarray:
    """The concentrations ``idx`` of one RGB block, stacked on a last axis (one deconvolution)."""
    return deconvolve(rgb, sm)[..., list(idx)]


def hematoxylin_dab(rgb, stain_matrix: StainMatrix | np.ndarray | None = None):
    """Hematoxylin and DAB concentration channels (float32 OD) of an RGB image.

    Works on NumPy (returns arrays) and dask arrays (returns lazy 2-D arrays, ``map_blocks``).

    Returns
    -------
    h, dab : 2-D float32 arrays
    """
    sm = as_stain_matrix(stain_matrix)
    ih, idab = sm.index("hematoxylin"), sm.index("dab")
    import dask.array as da

    if isinstance(rgb, da.Array):
        rgb = _rgb_chunks(rgb)
        # one deconvolution per chunk gives both channels
        hd = rgb.map_blocks(_stains, sm, (ih, idab), dtype=np.float32,
                            chunks=rgb.chunks[:2] + ((2,),),
                            meta=np.empty((0, 0, 0), np.float32))
        return hd[..., 0], hd[..., 1]
    conc = deconvolve(rgb, sm)
    return conc[..., ih].copy(), conc[..., idab].copy()


def reconstruct_rgb(
    concentrations: np.ndarray, stain_matrix: StainMatrix | np.ndarray | None = None
) -> np.ndarray:
    """Inverse of :func:`deconvolve` (Beer-Lambert): concentrations -> uint8 RGB."""
    sm = as_stain_matrix(stain_matrix)
    od = np.asarray(concentrations, dtype=np.float64) @ sm.rgb_from_stain
    rgb = 255.0 * np.power(10.0, -od)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def sample_blocks(numblocks: tuple[int, int], block_pixels: int, max_pixels: int,
                  rng: np.random.Generator) -> list[tuple[int, int]]:
    """The chunks :func:`sample_pixels` reads: enough ``(i, j)`` of a ``numblocks`` grid of
    chunks holding ``block_pixels`` each for ``4 * max_pixels`` pixels (at least 4), drawn
    from ``rng`` without replacement."""
    blocks = list(np.ndindex(*numblocks))
    n_blocks = min(len(blocks), max(4, int(np.ceil(4 * max_pixels / max(1, block_pixels)))))
    return [blocks[p] for p in rng.choice(len(blocks), size=n_blocks, replace=False)]


def sample_pixels(rgb, max_pixels: int = 200_000, seed: int = 0) -> np.ndarray:
    """A reproducible sample of up to ``max_pixels`` RGB pixels from a NumPy or dask image.

    For a dask array, one random subset of chunks is read (enough chunks for ``max_pixels``,
    spread over the slide), then pixels are drawn from them, so the cost does not grow with the
    slide. Returns an ``(n, 3)`` array of the input dtype.
    """
    import dask.array as da

    rng = np.random.default_rng(seed)
    if isinstance(rgb, da.Array):
        per_block = max(1, int(np.prod([c[0] for c in rgb.chunks[:2]])))
        pick = sample_blocks(rgb.numblocks[:2], per_block, max_pixels, rng)
        import dask

        parts = dask.compute(*[rgb.blocks[i, j].reshape(-1, rgb.shape[-1]) for i, j in pick])
        flat = np.concatenate(parts, axis=0)
    else:
        flat = np.asarray(rgb).reshape(-1, np.asarray(rgb).shape[-1])
    if flat.shape[0] > max_pixels:
        flat = flat[rng.choice(flat.shape[0], size=max_pixels, replace=False)]
    return flat


def estimate_stain_vectors_macenko(
    rgb_sample: np.ndarray,
    *,
    beta: float = 0.15,
    alpha: float = 1.0,
    reference: StainMatrix | np.ndarray | None = None,
    names: tuple[str, str] = ("hematoxylin", "dab"),
) -> StainMatrix:
    """Estimate two stain vectors per slide with Macenko et al. (ISBI 2009).

    Parameters
    ----------
    rgb_sample : array (..., 3)
        RGB pixels of the slide (uint8 or float in [0, 1]), e.g. from :func:`sample_pixels`.
        Background is dropped: pixels with OD below ``beta`` in any channel.
    beta : float
        OD threshold for "transparent" (background) pixels.
    alpha : float
        Percentile (and 100 - alpha) of the angle distribution taken as the extreme stains.
    reference : StainMatrix or array, optional
        Vectors used to name the two estimates (the estimate closest in angle to the reference
        hematoxylin row is called hematoxylin). Default: skimage HED's hematoxylin and DAB rows.
    names : (str, str)
        Names of the two stains.

    Returns
    -------
    StainMatrix
        Rows ``names[0]``, ``names[1]``, ``"residual"`` (cross product), ``source="macenko"``;
        ``info`` holds the sample size and the angle to each reference vector. The result is
        logged at INFO level so a run records what it used.
    """
    od = optical_density(np.asarray(rgb_sample)).reshape(-1, 3).astype(np.float64)
    tissue = od[np.all(od > beta, axis=1)]
    if tissue.shape[0] < 100:
        raise InvalidInputError(
            f"Macenko stain estimation needs >= 100 tissue pixels (OD > {beta} in all channels), "
            f"got {tissue.shape[0]}: sample more tissue or use the default HED vectors"
        )
    cov = np.cov(tissue, rowvar=False)
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, [2, 1]]  # two largest eigenvectors
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    est = [v / np.linalg.norm(v) * np.sign(v.sum() or 1.0) for v in (v1, v2)]

    if reference is None:
        ref = np.stack([HED.rgb_from_stain[0], HED.rgb_from_stain[2]])
    else:
        rsm = as_stain_matrix(reference)
        ref = rsm.rgb_from_stain[:2]
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    keep = float(est[0] @ ref[0] + est[1] @ ref[1])
    swap = float(est[1] @ ref[0] + est[0] @ ref[1])
    if swap > keep:
        est = est[::-1]
    rows = _complete(np.stack(est))
    angles = [float(np.degrees(np.arccos(np.clip(est[i] @ ref[i], -1, 1)))) for i in range(2)]
    sm = StainMatrix(
        rows,
        (names[0], names[1], "residual"),
        "macenko",
        {"n_pixels": int(tissue.shape[0]), "beta": beta, "alpha": alpha,
         "angle_to_reference_deg": [round(a, 3) for a in angles]},
    )
    log.info("Macenko stain vectors: %s", sm.to_dict())
    return sm
