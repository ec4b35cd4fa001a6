"""The docs site (docs/, ``make docs``) builds with warnings as errors and covers the public API."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

import daskpath

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _text(path: Path) -> str:
    text = html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))
    return " ".join(text.split())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("sphinx")  # the docs extra; installed by `make test`, so this runs in CI
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         "-d", str(tmp / "doctrees"), str(ROOT / "docs"), str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def test_api_page_lists_every_public_name(site):
    api = (site / "api.html").read_text(encoding="utf-8")
    text = _text(site / "api.html")
    for name in daskpath.__all__:
        assert f"daskpath.{name}" in text, f"daskpath.{name} is not on the API page"
    for name, module in daskpath._WHERE.items():
        # linked to its documentation on its module's page
        assert f'href="api/{module}.html#{module}.{name}"' in api, name
        assert f'id="{module}.{name}"' in (site / "api" / f"{module}.html").read_text("utf-8")


def test_guide_has_the_readme_sections(site):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    guide = _text(site / "guide.html")
    for title in re.findall(r"^##+ (.+)$", readme, re.MULTILINE):
        plain = " ".join(title.replace("`", "").split())
        assert plain in guide, f"README section {title!r} is not in the user guide"


def test_cli_page_has_every_subcommand(site):
    from daskpath.cli import build_parser

    cli = _text(site / "cli.html")
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices
               and a.dest == "command")
    for name in sub.choices:
        assert f"usage: daskpath {name}" in cli, name
