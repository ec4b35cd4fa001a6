"""Chunk-level progress per stage: counts, ETA, log lines, tqdm bars, Dask spans, Prometheus."""

from __future__ import annotations

import itertools
import logging
import re
import urllib.request

import pytest

from daskpath import runner
from daskpath.runner import _eta_text, _Progress

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n
STAGE = re.compile(r"(\w+): (\d+)/(\d+) chunks \((\d+) slides?(?:, (\d+) resumed)?\)(?: (ETA [^;]+))?")


class Clock:
    """A fake ``time.monotonic``."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _stages(line: str) -> dict[str, tuple]:
    return {m[0]: (int(m[1]), int(m[2]), int(m[3]), m[5]) for m in STAGE.findall(line)}


@pytest.fixture
def lines(monkeypatch):
    monkeypatch.setenv("DASKPATH_PROGRESS_INTERVAL", "30")
    clock = Clock()
    prog = _Progress(True, total=3, interactive=False, clock=clock)
    yield prog, clock
    prog.close()


# ------------------------------------------------------------------------ counts and the ETA
def test_eta_text():
    assert _eta_text(None) == "ETA ?"
    assert _eta_text(float("nan")) == "ETA ?"
    assert _eta_text(40.4) == "ETA 40 s"
    assert _eta_text(60) == "ETA 1 min"
    assert _eta_text(61) == "ETA 2 min"  # minutes round up
    assert _eta_text(12 * 60) == "ETA 12 min"
    assert _eta_text(2 * 3600 + 5 * 60) == "ETA 2 h 05 min"


def test_counts_per_stage_and_eta(lines):
    prog, clock = lines
    prog.chunks(100, 0, slide="a", stage="nuclei")
    assert prog.line() == "progress: 0 of 3 slide(s) done; nuclei: 0/100 chunks (1 slide) ETA ?"
    clock.t += 5
    prog.chunks(0, 2, slide="a", stage="nuclei")
    assert prog.line().endswith("nuclei: 2/100 chunks (1 slide) ETA ?")  # too few for a rate
    clock.t += 5
    prog.chunks(0, 3, slide="a", stage="nuclei")  # 5 in 10 s: 0.5/s, 95 left: 190 s
    assert prog.line().endswith("nuclei: 5/100 chunks (1 slide) ETA 4 min")
    prog.chunks(252, 0, slide="b", stage="nuclei")  # a second slide reaches the stage
    prog.chunks(50, 0, slide="a", stage="translate")
    clock.t += 10  # 5 in 20 s: 0.25/s, 347 left
    line = prog.line()
    assert line == ("progress: 0 of 3 slide(s) done; nuclei: 5/352 chunks (2 slides) ETA 24 min; "
                    "translate: 0/50 chunks (1 slide) ETA ?")
    prog.chunks(0, 347, slide="b", stage="nuclei")
    prog.slide("a")
    # a stage with every known chunk done shows no ETA
    assert prog.line().startswith("progress: 1 of 3 slide(s) done; nuclei: 352/352 chunks (2 slides); ")


def test_resumed_chunks_count_as_done_but_not_in_the_rate(lines):
    prog, clock = lines
    # 100 chunks, 60 of them done by an earlier run (loaded, not computed)
    prog.chunks(100, 0, slide="a", stage="nuclei", resumed=60)
    assert _stages(prog.line())["nuclei"] == (60, 100, 1, "ETA ?")
    clock.t += 10
    prog.chunks(0, 10, slide="a", stage="nuclei")  # 10 computed in 10 s: 1/s, 30 left
    assert _stages(prog.line())["nuclei"] == (70, 100, 1, "ETA 30 s")
    assert "(1 slide, 60 resumed)" in prog.line()


def test_time_without_chunks_outstanding_is_not_in_the_rate(lines):
    prog, clock = lines
    prog.chunks(10, 0, slide="a", stage="nuclei")
    clock.t += 10
    prog.chunks(0, 10, slide="a", stage="nuclei")  # 1/s; then the stage waits for slide b
    clock.t += 500
    prog.chunks(20, 0, slide="b", stage="nuclei")
    clock.t += 2  # 10 computed in 12 s with chunks outstanding (not 512 s), 20 left
    assert _stages(prog.line())["nuclei"][3] == "ETA 24 s"


# ------------------------------------------------------------------- lines without a terminal
def test_log_lines_every_interval_without_control_characters(lines, caplog):
    prog, clock = lines
    with caplog.at_level(logging.INFO, logger="daskpath.pipeline"):
        prog.chunks(40, 0, slide="a", stage="preprocess")
        prog.chunks(0, 20, slide="a", stage="preprocess")
        assert not caplog.records  # less than the interval (30 s) since the start
        clock.t += 31
        prog.chunks(0, 10, slide="a", stage="preprocess")
        clock.t += 5
        prog.chunks(0, 10, slide="a", stage="preprocess")  # within the interval: no line
        prog.chunks(8, 0, slide="a", stage="nuclei")
        prog.slide("a")
        prog.close()  # the final counts
    got = [r.getMessage() for r in caplog.records]
    assert got == [
        "progress: 0 of 3 slide(s) done; preprocess: 30/40 chunks (1 slide) ETA 10 s",
        ("progress: 1 of 3 slide(s) done; preprocess: 40/40 chunks (1 slide); "
         "nuclei: 0/8 chunks (1 slide) ETA ?"),
    ]
    assert not any(CONTROL.search(m) for m in got)


def test_bars_on_a_terminal_one_per_stage():
    clock = Clock()
    prog = _Progress(True, total=2, interactive=True, clock=clock)
    try:
        assert not prog.lines and list(prog.bars) == ["slides"]
        prog.chunks(30, 0, slide="a", stage="preprocess", resumed=10)
        prog.chunks(12, 0, slide="a", stage="nuclei")
        clock.t += 4
        prog.chunks(0, 4, slide="a", stage="nuclei")
        bars = prog.bars
        assert list(bars) == ["slides", "preprocess", "nuclei"]
        assert [abs(b.pos) for b in bars.values()] == [0, 1, 2]  # tqdm's position=
        assert (bars["preprocess"].n, bars["preprocess"].total) == (10, 30)
        assert (bars["nuclei"].n, bars["nuclei"].total) == (4, 12)
        assert not bars["nuclei"].leave and bars["slides"].leave
        assert str(bars["nuclei"]).endswith("4/12 chunks, 1 slide, ETA 8 s")
    finally:
        prog.close()


# ------------------------------------------------------------------- a real run: lines, spans
@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    """Two 1024x1024 phantom pairs."""
    from daskpath.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("pairs"), pairs=2, size=(1024, 1024), seed=11)


def _span_names(dask_scheduler):
    return sorted({"/".join(s.name) for s in dask_scheduler.extensions["spans"].spans.values()})


def _scheduler_metrics(client) -> dict[tuple[str, str, str], float]:
    """``{(metric, stage, slide): value}`` of the scheduler's ``/metrics``."""
    info = client.scheduler_info()
    host = info["address"].split("://")[1].rsplit(":", 1)[0]
    text = urllib.request.urlopen(f"http://{host}:{info['services']['dashboard']}/metrics",
                                  timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^(daskpath_stage_chunks\w*)\{([^}]*)\} (\S+)$', text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
        out[(m[1], labels.get("stage", ""), labels.get("slide", ""))] = float(m[3])
    return out


def test_pipeline_chunk_progress_spans_and_metrics(small_pairs, dask_client, tmp_path, caplog,
                                                   monkeypatch):
    pytest.importorskip("stardist")
    from daskpath.config import load_config
    from daskpath.pipeline import run

    monkeypatch.setenv("DASKPATH_PROGRESS_INTERVAL", "0.1")
    monkeypatch.setattr(runner, "_interactive", lambda: False)  # lines, as in a log file
    cfg = load_config(None, [f"slides={small_pairs}", f"output_dir={tmp_path / 'o'}",
                             "stages=[preprocess, nuclei]", "tiles.size=512"])
    with caplog.at_level(logging.INFO, logger="daskpath.pipeline"):
        res = run(cfg, client=dask_client, progress=True)
    assert res.ok, res.failures
    slides = list(res.stages)
    assert len(slides) == 2
    want = {st: sum(res.stages[s][st]["chunks"] for s in slides) for st in ("preprocess", "nuclei")}
    assert all(want.values()), want

    got = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert got and not any(CONTROL.search(m) for m in got)
    seen: dict[str, list[tuple[int, int]]] = {"preprocess": [], "nuclei": []}
    for line in got:
        for stage, (done, total, _, _) in _stages(line).items():
            seen[stage].append((done, total))
    for stage, counts in seen.items():
        assert counts, f"no progress line shows {stage}"
        assert counts[-1] == (want[stage], want[stage])  # chunk counts reach the total
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(counts))  # ordered
        assert all(d <= t for d, t in counts)

    # the dashboard's spans, "<stage>/<slide>": every nuclei computation has its own (its graph
    # holds the slide's image tasks); tasks whose TaskGroup (key prefix) is shared with another
    # slide's computation in flight join that slide's span (distributed's rule), so for
    # preprocess only one span per stage is certain
    names = set(dask_client.run_on_scheduler(_span_names))
    for s in slides:
        assert f"nuclei/{s}" in names, sorted(names)
    assert any(f"preprocess/{s}" in names for s in slides), sorted(names)

    # the scheduler's Prometheus gauges show the same counts
    metrics = _scheduler_metrics(dask_client)
    for s in slides:
        for stage in ("preprocess", "nuclei"):
            n = res.stages[s][stage]["chunks"]
            assert metrics[("daskpath_stage_chunks", stage, s)] == n
            assert metrics[("daskpath_stage_chunks_done", stage, s)] == n
    assert metrics[("daskpath_stage_chunks_computed_total", "nuclei", "")] >= want["nuclei"]


# ------------------------------------------------------------- SlideContext.compute on its own
def _ctx(tmp_path, client, calls, slide):
    import threading

    from daskpath.config import load_config
    from daskpath.stages import SlideContext

    return SlideContext(slide=slide, he="", ihc="", cfg=load_config(None, []), out=tmp_path,
                        client=client, stop=threading.Event(), work=tmp_path / "work",
                        stage="demo", on_chunks=lambda *a, **k: calls.append((a, k)))


def _chunk_tasks(ctx, n):
    import dask
    import numpy as np

    return [ctx.recorded(dask.delayed(np.full)(3, i), f"c{i}") for i in range(n)]


def test_compute_reports_chunks_resumed_and_spans(dask_client, tmp_path):
    calls: list = []
    ctx = _ctx(tmp_path, dask_client, calls, "ctx-a")
    out = ctx.compute(_chunk_tasks(ctx, 5))
    assert [int(o[0]) for o in out] == [0, 1, 2, 3, 4]
    kw = {"slide": "ctx-a", "stage": "demo", "resumed": 0}
    assert calls[0] == ((5, 0), kw)  # announced before the chunks run
    assert sum(a[1] for a, _ in calls) == 5 and all(k == kw for _, k in calls)
    assert "demo/ctx-a" in dask_client.run_on_scheduler(_span_names)
    # a rerun finds the records: 5 known, 5 resumed, none computed
    calls.clear()
    ctx = _ctx(tmp_path, dask_client, calls, "ctx-a")
    ctx.compute(_chunk_tasks(ctx, 5))
    assert calls == [((5, 0), {**kw, "resumed": 5})]
    metrics = _scheduler_metrics(dask_client)
    assert metrics[("daskpath_stage_chunks_done", "demo", "ctx-a")] == 5
    assert metrics[("daskpath_stage_chunks_resumed", "demo", "ctx-a")] == 5


def test_compute_counts_chunks_when_the_scheduler_cannot_be_asked(dask_client, tmp_path,
                                                                   monkeypatch):
    from daskpath import monitor

    def refuse(*a, **k):
        raise RuntimeError("not on this scheduler")

    monkeypatch.setattr(dask_client.scheduler, "get_task_status", refuse, raising=False)
    monkeypatch.setattr(monitor, "push_stage_chunks", refuse)
    calls: list = []
    ctx = _ctx(tmp_path, dask_client, calls, "ctx-b")
    ctx.compute(_chunk_tasks(ctx, 4))
    assert calls[0][0] == (4, 0) and sum(a[1] for a, _ in calls) == 4  # all, at the end


def _fail(i):
    if i == 2:
        raise ValueError("chunk 2 is bad")
    import numpy as np

    return np.full(3, i)


def test_a_failed_computation_takes_its_unfinished_chunks_out_of_the_totals(dask_client, tmp_path):
    import dask

    calls: list = []
    ctx = _ctx(tmp_path, dask_client, calls, "ctx-c")
    tasks = [ctx.recorded(dask.delayed(_fail)(i), f"c{i}") for i in range(3)]
    with pytest.raises(ValueError, match="chunk 2 is bad"):
        ctx.compute(tasks)
    submitted = sum(a[0] for a, _ in calls)
    finished = sum(a[1] for a, _ in calls)
    assert calls[0][0] == (3, 0) and submitted == finished < 3
