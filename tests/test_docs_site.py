"""The docs site reads as a site: the checks `make docs` runs, and their sources.

``tools/check_site.py`` runs on the built site in ``make docs``; here its
checks are tried on fragments that carry each regression, and the sources are
scanned so a Sphinx role fails the suite before the site is even built.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_site", ROOT / "tools" / "check_site.py")
assert _spec is not None and _spec.loader is not None
check_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_site)

CLEAN_PAGE = """<html><head><title>Periodic - avgfn</title></head><body>
<a href="periodic.html#avgfn.periodic">periodic</a> <a href="https://pytorch.org/">torch</a>
<div class="doc-signature highlight"><pre><code>periodic(
    period: int,
) -&gt; Averager</code></pre></div>
<p><span class="doc-section-title">Returns:</span></p>
<table><thead><tr><th>Type</th><th>Description</th></tr></thead></table>
</body></html>"""


def test_a_clean_page_has_no_finding():
    assert check_site.check_page(pathlib.Path("p.html"), CLEAN_PAGE, 100) == []


@pytest.mark.parametrize(
    "bad, what",
    [
        ("<p>An :class:<code>avgfn.Averager</code></p>", "Sphinx role"),
        ("<p>see :func:`avgfn.average`</p>", "Sphinx role"),
        ('<a href="../periodic/">periodic</a>', "directory"),
        ('<a href="./">home</a>', "directory"),
        (
            '<span class="doc-section-title">Returns:</span><table><tr><th>Name</th>'
            "<th>Type</th><th>Description</th></tr></table>",
            "Name column",
        ),
        (
            '<div class="doc-signature highlight"><pre><code>f(' + "a: int, " * 20 + ")</code></pre>",
            "signature line",
        ),
    ],
)
def test_each_regression_is_found(bad, what):
    found = check_site.check_page(pathlib.Path("p.html"), CLEAN_PAGE.replace("</body>", bad + "</body>"), 100)
    assert len(found) == 1 and what in found[0], found


def test_two_pages_with_one_title_are_found(tmp_path):
    (tmp_path / "index.html").write_text(CLEAN_PAGE)
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "periodic.html").write_text(CLEAN_PAGE)
    found = check_site.check_site(tmp_path)
    assert len(found) == 1 and "same title" in found[0]


def test_an_unbuilt_site_is_a_finding(tmp_path):
    assert "build the site first" in check_site.check_site(tmp_path)[0]


SOURCES = sorted((ROOT / "avgfn").rglob("*.py")) + sorted((ROOT / "docs").rglob("*.md"))


def test_no_sphinx_role_in_docstrings_or_pages():
    role = re.compile(r":(class|func|meth|attr|mod|data|exc|obj):`")
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in SOURCES
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if role.search(line)
    ]
    assert hits == [], "write [`Name`][avgfn.Name] instead of Sphinx roles: " + ", ".join(hits)


def test_the_site_is_built_for_file_urls():
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^use_directory_urls: false$", config, re.M)
    assert "tools/check_site.py site" in (ROOT / "Makefile").read_text()
