"""Sphinx configuration of the daskpath docs: ``make docs`` (warnings are errors).

The API reference is built from the docstrings (autodoc + numpydoc); the user guide is the
README's sections, converted from Markdown at build time (``_ext/daskpath_docs.py``). Nothing is
fetched from the network (no intersphinx), and the heavy optional dependencies are mocked, so a
build needs only the ``docs`` extra and the package's own dependencies.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))  # document the checkout, installed or not

import daskpath

project = "daskpath"
author = "daskpath developers"
copyright = "daskpath developers"
version = release = daskpath.__version__

extensions = [
    "sphinx.ext.autodoc",
    "numpydoc",
    "daskpath_docs",
]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "**.md"]
# objects are linked within these docs only: no intersphinx (builds have no network)

# -- autodoc / numpydoc -------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Imported lazily by daskpath; mocked so that documenting a module never loads (or needs) them.
autodoc_mock_imports = [
    "tensorflow", "keras", "stardist", "csbdeep",
    "torch", "torchvision",
    "sklearn", "skops",
    "dask_cuda", "dask_jobqueue", "dask_kubernetes",
]
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"daskpath {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = False
html_static_path: list[str] = []
