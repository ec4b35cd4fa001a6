"""Sphinx extension of the daskpath docs: Markdown pages, the public API table, the CLI reference.

The project's prose lives in Markdown (``README.md``, ``cluster/README.md``,
``docs/writing-a-stage.md``); no Markdown parser ships with Sphinx, so ``.. markdown:: PATH``
converts the file (or some of its sections) to reStructuredText with ``markdown-it-py`` at build
time, and the docs never drift from the README.

Directives
----------
``.. markdown:: ../README.md``
    Insert a Markdown file. ``:part: intro`` takes the text before the first ``##`` heading (the
    ``#`` title left out), ``:part: sections`` every ``##`` section, ``:part: body`` everything
    but the ``#`` title, and ``:section: TITLE`` one ``##`` section; default: the whole file.
``.. daskpath-public-api::``
    A table of the names in ``daskpath._WHERE`` (what ``daskpath.__all__`` lists), each linked
    to its documentation in its module's page. A public name that no module page documents is a
    build warning (an error under ``-W``).
``.. daskpath-cli::``
    The ``--help`` of ``daskpath`` and of each subcommand, from ``daskpath.cli.build_parser()``,
    and of the trainers behind ``daskpath train WHAT -- --help``.

``generate_module_pages`` writes one ``api/<module>.rst`` per documented module (the fixed list
below plus every module ``daskpath._WHERE`` names), so a public name from a new module gets its
page without editing the docs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import re
from pathlib import Path, PurePosixPath
from typing import ClassVar

from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList
from sphinx.util import logging

logger = logging.getLogger(__name__)

# Modules with a page in the API reference, besides those that daskpath._WHERE names. A module
# that does not exist (yet) is left out.
DOCUMENTED_MODULES = [
    "daskpath.config",
    "daskpath.pipeline",
    "daskpath.io",
    "daskpath.ome",
    "daskpath.tissue",
    "daskpath.similarity",
    "daskpath.tiles",
    "daskpath.registration",
    "daskpath.qc",
    "daskpath.nuclei",
    "daskpath.stain",
    "daskpath.metrics",
    "daskpath.translate",
    "daskpath.baselines",
    "daskpath.cluster",
    "daskpath.stages",
    "daskpath.synthetic",
    "daskpath.fetch",
    "daskpath.errors",
]

# Markdown files that are pages of these docs: links to them become links to the page.
MARKDOWN_PAGES = {
    "README.md": "/guide",
    "docs/writing-a-stage.md": "/stages",
    "cluster/README.md": "/clusters",
}

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- Markdown -> rST

_ADORNMENT = {1: "=", 2: "-", 3: "~", 4: "^", 5: '"', 6: "'"}
_LANGS = {"bash", "sh", "shell", "console", "python", "py", "yaml", "json", "toml", "ini", "text"}
_ESCAPE = re.compile(r"([\\*`|_])")
# what would start a block construct (list, enumeration, field, option, doctest, directive ...)
_BLOCK_START = re.compile(r"^([-+*:>|(]|#\.|\.\.|([0-9]+|[A-Za-z]{1,4})[.)](\s|$))")


def _indent(lines: list[str]) -> list[str]:
    return ["   " + ln if ln.strip() else "" for ln in lines]


def _esc(text: str) -> str:
    return _ESCAPE.sub(r"\\\1", text)


def _literal(code: str) -> str:
    code = code.strip()
    if not code:
        return ""
    if "``" in code or code.endswith("`"):
        return ":literal:`" + code.replace("\\", "\\\\").replace("`", "\\`") + "`"
    return f"``{code}``"


def _plain(nodes_) -> str:
    """The text of inline syntax-tree nodes, markup dropped."""
    out = ""
    for n in nodes_:
        if n.type in ("text", "code_inline"):
            out += n.content
        elif n.type in ("softbreak", "hardbreak"):
            out += " "
        elif n.children:
            out += _plain(n.children)
    return out


class _Converter:
    """Markdown (CommonMark + pipe tables) to reStructuredText, for the subset the project uses."""

    def __init__(self, source: Path):
        self.source = source
        self.rel_dir = PurePosixPath(source.resolve().relative_to(ROOT).parent.as_posix()) \
            if source.resolve().is_relative_to(ROOT) else None

    # ---- inline
    def _link(self, href: str, inner) -> tuple[str, str]:
        text = _plain(inner).strip()
        if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # http:, https:, mailto:
            label = text.replace("`", "").replace("<", "(").replace(">", ")")
            return "markup", f"`{label} <{href}>`__" if label and label != href else href
        if href.startswith("#"):
            return "markup", f"`{text.replace('`', '')} <{href}>`__"
        path = href.partition("#")[0]
        target = None
        if self.rel_dir is not None:
            parts: list[str] = []
            for part in (self.rel_dir / path).parts:
                if part == "..":
                    if parts:
                        parts.pop()
                elif part != ".":
                    parts.append(part)
            target = "/".join(parts)
        if target in MARKDOWN_PAGES:
            if text in (href, path, target):  # the link shows the file: show the page's title
                return "markup", f":doc:`{MARKDOWN_PAGES[target]}`"
            label = text.replace("`", "").replace("<", "(").replace(">", ")")
            return "markup", f":doc:`{label} <{MARKDOWN_PAGES[target]}>`"
        # a file of the repository: keep the text, name the path when the text does not
        shown = self.inline(inner)
        if target and target not in text and path not in text:
            return "markup", f"{shown} ({_literal(target)})"
        return "markup", shown

    def inline(self, tokens) -> str:
        pieces: list[tuple[str, str]] = []  # (kind, text): "text" or "markup"
        for t in tokens:
            if t.type in ("text", "html_inline"):
                pieces.append(("text", _esc(t.content)))
            elif t.type == "code_inline":
                pieces.append(("markup", _literal(t.content)))
            elif t.type in ("softbreak", "hardbreak"):
                pieces.append(("text", " "))
            elif t.type == "link":
                pieces.append(self._link(str(t.attrs.get("href", "")), t.children))
            elif t.type in ("strong", "em"):
                # reST does not nest inline markup: the text of the span, emphasised
                mark = "**" if t.type == "strong" else "*"
                text = _plain(t.children).strip()
                if text:
                    pieces.append(("markup", f"{mark}{_esc(text)}{mark}"))
            elif t.type == "image":
                pieces.append(("text", _esc(_plain(t.children))))
            else:
                logger.warning("markdown: %s: unsupported inline %r", self.source, t.type)
        out = ""
        prev_kind = None
        for kind, text in pieces:
            if not text:
                continue
            if out and (kind == "markup" or prev_kind == "markup") and not out[-1].isspace() \
                    and not text[0].isspace():
                out += "\\ "
            out += text
            prev_kind = kind
        out = out.strip()
        first = next((p for p in pieces if p[1].strip()), ("markup", ""))
        if first[0] == "text" and _BLOCK_START.match(out):
            out = "\\" + out
        if out.endswith("::"):
            out = out[:-1] + "\\:"
        return out

    # ---- blocks
    def block(self, node) -> list[str]:
        kind = node.type
        if kind == "heading":
            level = int(node.tag[1])
            title = self.inline(node.children[0].children)
            line = _ADORNMENT[level] * (len(title) + 2)
            return [line, title, line] if level == 1 else [title, line]
        if kind == "paragraph":
            return [self.inline(node.children[0].children)]
        if kind == "fence" or kind == "code_block":
            info = (node.info or "").strip().split()
            lang = info[0].lower() if info else "text"
            lang = lang if lang in _LANGS else "text"
            body = node.content.rstrip("\n").splitlines()
            return [f".. code-block:: {lang}", ""] + _indent(body)
        if kind in ("bullet_list", "ordered_list"):
            out: list[str] = []
            start = int(node.attrs.get("start", 1) or 1)
            for k, item in enumerate(node.children):
                marker = "- " if kind == "bullet_list" else f"{start + k}. "
                body = self.blocks(item.children) or [""]
                pad = " " * len(marker)
                out += [marker + body[0]] + [pad + ln if ln else "" for ln in body[1:]] + [""]
            return out[:-1]
        if kind == "table":
            rows = [tr for part in node.children for tr in part.children]
            out = [".. list-table::", "   :header-rows: 1", "   :widths: auto", ""]
            for tr in rows:
                for k, cell in enumerate(tr.children):
                    text = self.inline(cell.children[0].children) if cell.children else ""
                    lead = "   * - " if k == 0 else "     - "
                    out.append((lead + text).rstrip())
            return out
        if kind == "blockquote":
            return ["   " + ln if ln else "" for ln in self.blocks(node.children)]
        if kind in ("hr", "html_block"):
            return []
        logger.warning("markdown: %s: unsupported block %r", self.source, kind)
        return []

    def blocks(self, children) -> list[str]:
        out: list[str] = []
        for child in children:
            lines = self.block(child)
            if lines:
                out += lines + [""]
        return out[:-1]


def markdown_to_rst(path: Path, part: str | None = None, section: str | None = None) -> str:
    """The reStructuredText of a Markdown file, or of some of its sections (see the module doc)."""
    from markdown_it import MarkdownIt
    from markdown_it.tree import SyntaxTreeNode

    md = MarkdownIt("commonmark").enable("table")
    root = SyntaxTreeNode(md.parse(path.read_text(encoding="utf-8")))
    children = list(root.children)
    h2 = [k for k, c in enumerate(children) if c.type == "heading" and c.tag == "h2"]
    first_h2 = h2[0] if h2 else len(children)
    no_title = [c for c in children if not (c.type == "heading" and c.tag == "h1")]
    if part == "intro":
        children = [c for c in children[:first_h2] if not (c.type == "heading" and c.tag == "h1")]
    elif part == "sections":
        children = children[first_h2:]
    elif part == "body":
        children = no_title
    elif section is not None:
        starts = [k for k in h2 if _plain(children[k].children[0].children).strip() == section]
        if not starts:
            raise ValueError(f"{path}: no '## {section}' section")
        end = next((k for k in h2 if k > starts[0]), len(children))
        children = children[starts[0]:end]
    return "\n".join(_Converter(path).blocks(children)) + "\n"


class MarkdownDirective(Directive):
    """``.. markdown:: PATH`` (relative to the page): insert the file converted to rST."""

    required_arguments = 1
    option_spec: ClassVar = {
        "part": lambda a: directives.choice(a, ("intro", "sections", "body")),
        "section": directives.unchanged_required,
    }

    def run(self):
        env = self.state.document.settings.env
        rel, path = env.relfn2path(self.arguments[0])
        env.note_dependency(rel)
        try:
            opts = self.options
            text = markdown_to_rst(Path(path), opts.get("part"), opts.get("section"))
        except (OSError, ValueError) as e:
            raise self.severe(f"markdown: {e}") from e
        self.state_machine.insert_input(StringList(text.splitlines(), source=path), path)
        return []


# --------------------------------------------------------------------------- public API table


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    return "function" if callable(obj) else "data"


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


class PublicApiDirective(Directive):
    """A table of ``daskpath``'s public names, each linked to its module page."""

    def run(self):
        import daskpath

        env = self.state.document.settings.env
        env.note_dependency(str(ROOT / "daskpath" / "__init__.py"))
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: auto", "",
                 "   * - name", "     - what", "     - documented in"]
        for name, module in daskpath._WHERE.items():
            obj = getattr(daskpath, name)
            kind = _kind(obj)
            role = {"exception": "exc", "class": "class", "function": "func"}.get(kind, "data")
            lines += [f"   * - :{role}:`daskpath.{name} <{module}.{name}>`",
                      f"     - {_summary(obj)}" if _summary(obj) else "     - ",
                      f"     - :mod:`{module}`"]
        text = "\n".join(lines).replace("     - \n", "     -\n")
        self.state_machine.insert_input(StringList(text.splitlines(), source="daskpath._WHERE"),
                                        "daskpath._WHERE")
        return []


def check_public_api(app, env):
    """Warn when a public name has no documentation in its module page."""
    import daskpath

    objects = env.get_domain("py").objects
    for name, module in daskpath._WHERE.items():
        if f"{module}.{name}" not in objects:
            logger.warning(
                "daskpath.%s is public (daskpath._WHERE) but %s.%s is not documented: list it "
                "in %s.__all__ and give it a docstring", name, module, name, module,
                location="api")


# --------------------------------------------------------------------------- CLI reference

_TRAINERS = {
    "stardist": "daskpath.train_stardist",
    "translator": "daskpath.translate.train",
    "rf": "daskpath.baselines.rf",
    "classifier": "daskpath.baselines.classifier",
}


@contextlib.contextmanager
def _fixed_width():
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ["COLUMNS"], os.environ["NO_COLOR"] = "100", "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _trainer_help(module: str) -> str | None:
    """``--help`` of a trainer's ``main(argv)``, or None where its dependencies are missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        mod.main(["--help"])
    return buf.getvalue()


def _block(text: str) -> list[str]:
    return [".. code-block:: text", "", *_indent(text.rstrip().splitlines()), ""]


class CliDirective(Directive):
    """The ``--help`` of every ``daskpath`` subcommand."""

    def run(self):
        from daskpath.cli import build_parser

        env = self.state.document.settings.env
        env.note_dependency(str(ROOT / "daskpath" / "cli.py"))
        with _fixed_width():
            parser = build_parser()
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            lines = ["``daskpath``", "-" * 14, ""] + _block(parser.format_help())
            for name, sp in sub.choices.items():
                title = f"``daskpath {name}``"
                lines += [title, "-" * (len(title) + 2), ""] + _block(sp.format_help())
                if name == "train":
                    for what, module in _TRAINERS.items():
                        title = f"``daskpath train {what} -- --help``"
                        lines += [title, "~" * (len(title) + 2), ""]
                        text = _trainer_help(module)
                        missing = (f"Not available in this build: ``{module}`` needs an "
                                   "optional dependency that is not installed.")
                        lines += _block(text) if text else [missing, ""]
        self.state_machine.insert_input(StringList(lines, source="daskpath.cli"), "daskpath.cli")
        return []


# --------------------------------------------------------------------------- module pages


def documented_modules() -> list[str]:
    import daskpath

    mods = list(DOCUMENTED_MODULES)
    mods += [m for m in dict.fromkeys(daskpath._WHERE.values()) if m not in mods]
    return [m for m in mods if importlib.util.find_spec(m) is not None]


def generate_module_pages(app, config=None):
    """Write ``api/<module>.rst`` for each documented module; remove pages of vanished ones."""
    out = Path(app.srcdir) / "api"
    out.mkdir(exist_ok=True)
    wanted = {}
    for mod in documented_modules():
        line = "=" * len(mod)
        wanted[f"{mod}.rst"] = (
            ".. This page is generated by docs/_ext/daskpath_docs.py; edits are overwritten.\n\n"
            f"{line}\n{mod}\n{line}\n\n.. automodule:: {mod}\n")
    for old in out.glob("*.rst"):
        if old.name not in wanted:
            old.unlink()
    for name, text in wanted.items():
        path = out / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)


def setup(app):
    app.add_directive("markdown", MarkdownDirective)
    app.add_directive("daskpath-public-api", PublicApiDirective)
    app.add_directive("daskpath-cli", CliDirective)
    app.connect("config-inited", generate_module_pages)
    app.connect("env-check-consistency", check_public_api)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
