"""The translate stage translates only what the nuclei step reads (boxes, not whole chunks).

References: :func:`daskpath.translate.translate` over whole chunks (today's path), on a small
phantom whose 512-px tiles sit across 768-px chunk borders.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def he():
    from daskpath.synthetic import render_region

    he, _ = render_region(0, 0, 1000, 1100, size=(1000, 1100), seed=3, stain="he")
    return np.ascontiguousarray(he[..., :3])


@pytest.fixture(scope="module")
def whole(he):
    """``translate()`` on 384-px chunks: today's per-chunk result."""
    import dask.array as da

    from daskpath.translate import translate

    return translate(da.from_array(he, chunks=(384, 384, 3))).compute(scheduler="sync")


@pytest.mark.parametrize("box", [
    (0, 100, 0, 100),        # slide corner
    (388, 600, 400, 404),    # inside a chunk, thin
    (300, 500, 700, 1100),   # across chunk borders, right edge
    (900, 1000, 1000, 1100), # far corner
    (120, 764, 4, 380),      # most of a chunk
])
def test_a_box_equals_the_whole_chunk_translation(he, whole, box) -> None:
    import dask.array as da

    from daskpath.translate.inference import translator

    tr = translator(da.from_array(he, chunks=(384, 384, 3)))
    assert tr.exact_boxes and tr.multiple == 4
    b = tr.snap(box, he.shape)
    got = tr.region(he, b, he.shape)
    want = whole[b[0]:b[1], b[2]:b[3]]
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_region_refuses_boxes_off_the_stride_grid(he) -> None:
    import dask.array as da

    from daskpath.errors import InvalidInputError
    from daskpath.translate.inference import translator

    tr = translator(da.from_array(he, chunks=(384, 384, 3)))
    assert tr.snap((5, 10, 3, 999), (1000, 1001)) == (4, 12, 0, 1000)
    assert tr.snap((5, 999, 3, 1001), (1000, 1001)) == (4, 1000, 0, 1001)
    with pytest.raises(InvalidInputError, match="snap"):
        tr.region(he, (5, 10, 0, 8), he.shape)


def test_chunk_boxes_cover_the_rectangles_with_fewer_pixels() -> None:
    from daskpath.stages.translate import chunk_boxes

    def snap(b):
        return (b[0] // 4 * 4, -(-b[1] // 4) * 4, b[2] // 4 * 4, -(-b[3] // 4) * 4)

    chunk = (0, 2048, 0, 2048)
    rects = [(0, 80, 0, 80), (1947, 2100, 1950, 2300), (1000, 1100, 1000, 1100), (1010, 1090, 1050, 1200)]
    boxes = chunk_boxes(rects, chunk, snap, 64)
    cover = np.zeros((2048, 2048), bool)
    for y0, y1, x0, x1 in boxes:
        assert y0 % 4 == 0 and x0 % 4 == 0 and 0 <= y0 < y1 <= 2048 and 0 <= x0 < x1 <= 2048
        cover[y0:y1, x0:x1] = True
    for y0, y1, x0, x1 in rects:
        assert cover[y0:min(y1, 2048), x0:min(x1, 2048)].all()
    assert len(boxes) == 3  # the two overlapping rectangles merge, the far ones stay apart
    assert chunk_boxes([(3000, 3100, 0, 10)], chunk, snap, 64) == []


@pytest.mark.parametrize("stain", ["hed", "macenko"])
def test_percentile_blocks_are_the_blocks_sample_pixels_reads(stain) -> None:
    """The replica of the block pick of ``stain.sample_pixels`` (slide_percentiles and Macenko)."""
    import dask.array as da

    from daskpath.config import load_config
    from daskpath.stages.translate import percentile_blocks
    from daskpath.stain import sample_pixels

    cfg = load_config(None, ["tiles.size=256", f"nuclei.stain_matrix={stain}"])
    shape = (256 * 12 + 100, 256 * 11)
    ids = np.zeros(shape, np.float64)
    ys, xs = range(0, shape[0], 256), range(0, shape[1], 256)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            ids[y:y + 256, x:x + 256] = i * 100 + j
    arr = da.from_array(ids[..., None], chunks=(256, 256, 1))
    seen = set(np.unique(sample_pixels(arr, max_pixels=2_000_000)).astype(int))
    if stain == "macenko":
        seen |= set(np.unique(sample_pixels(arr)).astype(int))
    got = {(y0 // 256) * 100 + x0 // 256 for y0, _, x0, _ in percentile_blocks(cfg, shape)}
    assert got == seen


class _Snap:
    """A stand-in RegionTranslator for planning (ResNet stride 4, halo 64)."""

    exact_boxes, depth, multiple = True, 64, 4

    def snap(self, b, shape):
        return (max(0, b[0] // 4 * 4), min(shape[0], -(-b[1] // 4) * 4),
                max(0, b[2] // 4 * 4), min(shape[1], -(-b[3] // 4) * 4))


@pytest.mark.parametrize("nuclei_chunk", [None, 1536])
def test_plan_translates_what_nuclei_read_and_less_than_whole_chunks(nuclei_chunk) -> None:
    """8192 px slide, 2048 px chunks, 25 scattered kept 1024 px tiles (the benchmark's layout):
    the boxes cover every pixel the nuclei step reads and the normalisation's sampled blocks
    in chunks near kept tiles, lie inside their chunk, and add up to far fewer pixels."""
    from daskpath.config import load_config
    from daskpath.nuclei import chunks_in_region
    from daskpath.stages.translate import nuclei_reads, percentile_blocks, translation_plan

    extra = [f"nuclei.chunk_size={nuclei_chunk}"] if nuclei_chunk else []
    cfg = load_config(None, ["tiles.size=1024", *extra])
    shape, c = (8192, 8192), (2048,) * 4
    rng = np.random.default_rng(1)
    cells = rng.choice(64, size=25, replace=False)
    kept = [(int(k // 8) * 1024, int(k // 8) * 1024 + 1024, int(k % 8) * 1024, int(k % 8) * 1024 + 1024)
            for k in cells]
    plan = translation_plan(cfg, shape, (c, c), kept, _Snap())
    ys = xs = np.r_[0, np.cumsum(c)]
    cover = np.zeros(shape, bool)
    for (i, j), (chunk, boxes) in plan.items():
        assert chunk == (ys[i], ys[i + 1], xs[j], xs[j + 1])
        for y0, y1, x0, x1 in boxes:
            assert chunk[0] <= y0 < y1 <= chunk[1] and chunk[2] <= x0 < x1 <= chunk[3]
            assert y0 % 4 == 0 and x0 % 4 == 0
            cover[y0:y1, x0:x1] = True
    for y0, y1, x0, x1 in nuclei_reads(cfg, shape, kept):
        assert cover[y0:y1, x0:x1].all()
    grown = [(max(0, a - 80), b + 80, max(0, x - 80), d + 80) for a, b, x, d in kept]
    near = chunks_in_region(ys, xs, grown)
    for y0, y1, x0, x1 in percentile_blocks(cfg, shape):
        for i, j in zip(*np.nonzero(near)):
            a, b = max(y0, ys[i]), min(y1, ys[i + 1])
            x, d = max(x0, xs[j]), min(x1, xs[j + 1])
            if a < b and x < d:
                assert cover[a:b, x:d].all()
    translated = sum((b[1] - b[0]) * (b[3] - b[2]) for _, bs in plan.values() for b in bs)
    whole = int(near.sum()) * 2048 * 2048
    # nuclei chunks of 1536 px across the 1024 px tiles read almost every chunk whole
    assert translated <= (0.8 if nuclei_chunk is None else 1.0) * whole, (translated, whole)


@pytest.mark.slow  # StarDist twice + the generator on a process cluster: ~1-2 min on 2 cores
@pytest.mark.nuclei
def test_stage_translates_less_and_keeps_the_nuclei(tmp_path, dask_client) -> None:
    """Pipeline run vs today's whole-chunk path: same virtual pixels in what the nuclei step
    reads (within 1 uint8 level), the same nuclei on kept tiles, fewer pixels translated."""
    pytest.importorskip("stardist")
    import dask.array as da

    from daskpath import io, ome
    from daskpath.config import load_config
    from daskpath.nuclei import chunks_in_region, default_depth, measure_nuclei, resolve_model
    from daskpath.pipeline import run
    from daskpath.stages.translate import nuclei_reads, translation_plan
    from daskpath.synthetic import make_cohort
    from daskpath.translate import translate
    from daskpath.translate.inference import translator

    manifest = make_cohort(tmp_path / "data", pairs=1, size=(1536, 1536), seed=7)
    cfg = load_config(None, [f"slides={manifest}", f"output_dir={tmp_path / 'out'}", "tiles.size=512",
                             "chunk_size=768", "stages=[preprocess,nuclei,translate]"])
    res = run(cfg, client=dask_client)
    assert res.ok, res.failures
    slide = res.slides.slide[0]
    tiles = res.tiles[res.tiles.slide == slide].reset_index(drop=True)
    kept = tiles[tiles.keep.astype(bool)]
    assert 0 < len(kept) < len(tiles)
    region = list(zip(kept.y0, kept.y0 + kept.height, kept.x0, kept.x0 + kept.width))

    # today's path: whole 768-px chunks that meet a kept tile grown by the nuclei halo
    ds = io.open_pair(*(manifest.parent / n for n in pd.read_csv(manifest).iloc[0, 1:]), chunk_size=768)
    full = translate(ds["he"].data, cfg.translate.model, batch_size=cfg.translate.batch_size,
                     blend=cfg.translate.blend, norm_stats=cfg.translate.norm_stats)
    cy, cx = full.chunks[:2]
    full = full.compute(scheduler="threads")
    margin = default_depth(resolve_model(cfg.nuclei.model))
    grown = [(max(0, a - margin), b + margin, max(0, c - margin), d + margin) for a, b, c, d in region]
    ys, xs = np.r_[0, np.cumsum(cy)], np.r_[0, np.cumsum(cx)]
    today = np.full_like(full, 255)
    for i, j in zip(*np.nonzero(chunks_in_region(ys, xs, grown))):
        sl = (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
        today[sl] = full[sl]

    virtual = ome.read_image(tmp_path / "out" / "layers" / f"{slide}.virtual.zarr")
    # every pixel the nuclei step reads equals today's (within float rounding)
    read = np.zeros(virtual.shape[:2], bool)
    for y0, y1, x0, x1 in nuclei_reads(cfg, virtual.shape[:2], region):
        read[y0:y1, x0:x1] = True
    assert np.abs(virtual.astype(int) - today.astype(int))[read].max() <= 1
    # ... and that was all today translated near kept tiles when tiles and nuclei chunks agree
    assert (np.abs(virtual.astype(int) - full.astype(int)).max(axis=2) <= 1).sum() >= read.sum()

    # no more pixels translated (on a slide this small the normalisation's 2 MP sample covers
    # every block, so all of today's chunks are still needed: see the planning test below)
    plan = translation_plan(cfg, virtual.shape[:2], (cy, cx), region, translator(ds["he"].data))
    boxes = sum((b[1] - b[0]) * (b[3] - b[2]) for _, bs in plan.values() for b in bs)
    chunks_px = sum((ys[i + 1] - ys[i]) * (xs[j + 1] - xs[j])
                    for i, j in zip(*np.nonzero(chunks_in_region(ys, xs, grown))))
    assert boxes <= chunks_px, (boxes, chunks_px)
    painted = ~(virtual == 255).all(axis=2)
    inside = np.zeros_like(painted)
    for chunk, bs in plan.values():
        for y0, y1, x0, x1 in bs:
            inside[y0:y1, x0:x1] = True
    assert not (painted & ~inside).any()  # white outside the translated boxes

    # the nuclei of the virtual IHC on kept tiles: the same as on today's image
    img = da.from_array(today, chunks=(768, 768, 3)).rechunk((512, 512, 3))
    want = measure_nuclei(img, model=cfg.nuclei.model, method=cfg.nuclei.method,
                          dab_threshold=cfg.nuclei.dab_threshold,
                          stain_matrix=None if cfg.nuclei.stain_matrix == "hed" else cfg.nuclei.stain_matrix,
                          prob_thresh=cfg.nuclei.prob_thresh, nms_thresh=cfg.nuclei.nms_thresh,
                          region=kept[["y0", "x0", "height", "width"]])
    got = pd.read_parquet(tmp_path / "out" / "nuclei" / f"{slide}.virtual.parquet")
    assert len(got) == len(want) > 0
    key = ["y", "x"]
    got = got.sort_values(key).reset_index(drop=True)
    want = want.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(got[key].to_numpy(float), want[key].to_numpy(float), atol=0.5)
    np.testing.assert_array_equal(got["positive"].to_numpy(), want["positive"].to_numpy())
    np.testing.assert_array_equal(got["area"].to_numpy(), want["area"].to_numpy())


@pytest.mark.parametrize("kw", [{"norm_stats": "tile"}, {"blend": "feather"}])
def test_layout_dependent_translations_fall_back_to_whole_chunks(he, kw) -> None:
    """Per-window statistics and feathered blending depend on the window layout: no boxes."""
    import dask.array as da

    from daskpath.translate.inference import translator

    assert not translator(da.from_array(he, chunks=(384, 384, 3)), **kw).exact_boxes
