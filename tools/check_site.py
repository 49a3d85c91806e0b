"""Check the built documentation site for regressions that mkdocs accepts.

``mkdocs build --strict`` fails on broken links and unknown cross-references,
but not on what a reader sees as broken. This script reads the built HTML and
fails (exit status 1, one line per finding) on:

* a Sphinx role left in the text (``:class:`Round```): mkdocstrings prints
  those raw; write ``[`Round`][avgfn.Round]`` instead;
* a "Returns" table with a name column: Google-style ``Returns:`` sections
  whose first word is read as a name (``An``, ``A``);
* an internal link to a directory (``href="periodic/"``): opened from disk
  (``file://``) such a link shows a directory listing;
* two pages with the same ``<title>``;
* a signature line longer than ``--max-signature`` characters.

Usage::

    python tools/check_site.py site
"""

from __future__ import annotations

import argparse
import html
import pathlib
import re
import sys

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|py:\w+):[`\w~]")
TAG = re.compile(r"<[^>]+>")
HREF = re.compile(r'href="([^"#?]*)[^"]*"')
TITLE = re.compile(r"<title>(.*?)</title>", re.S)
SIGNATURE = re.compile(r'<div class="doc-signature[^"]*"><pre>(.*?)</pre>', re.S)
RETURNS = re.compile(r"Returns:</span>.*?</table>", re.S)
HEADER = re.compile(r"<th>(.*?)</th>", re.S)


def text_of(fragment: str) -> str:
    """The text a reader sees in an HTML fragment."""
    return html.unescape(TAG.sub("", fragment))


def check_page(path: pathlib.Path, page: str, max_signature: int) -> list[str]:
    """The findings on one built page."""
    found = []
    text = text_of(page)
    for match in ROLE.finditer(text):
        found.append(f"{path}: Sphinx role left raw: {text[match.start():match.start() + 40]!r}")
    for table in RETURNS.findall(page):
        headers = [text_of(h).strip() for h in HEADER.findall(table)]
        if "Name" in headers:
            found.append(f"{path}: a Returns table has a Name column ({headers})")
    for target in HREF.findall(page):
        if target.endswith("/") and "://" not in target and not target.startswith("mailto:"):
            found.append(f"{path}: link to a directory {target!r} (breaks from file://)")
    for signature in SIGNATURE.findall(page):
        for line in text_of(signature).splitlines():
            if len(line) > max_signature:
                found.append(f"{path}: signature line of {len(line)} characters: {line[:60]!r}...")
    return found


def check_site(site: pathlib.Path, max_signature: int = 100) -> list[str]:
    """Every finding on the site built in ``site``."""
    if not (site / "index.html").is_file():
        return [f"{site}: no index.html; build the site first (make docs)"]
    found: list[str] = []
    titles: dict[str, pathlib.Path] = {}
    for path in sorted(site.rglob("*.html")):
        page = path.read_text(encoding="utf-8")
        relative = path.relative_to(site)
        found += check_page(relative, page, max_signature)
        title = TITLE.search(page)
        if title is None or relative.name == "404.html":
            continue
        name = text_of(title.group(1)).strip()
        if name in titles:
            found.append(f"{relative}: same title {name!r} as {titles[name]}")
        titles[name] = relative
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=pathlib.Path, help="the built site's folder")
    parser.add_argument("--max-signature", type=int, default=100)
    args = parser.parse_args(argv)
    found = check_site(args.site, args.max_signature)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"check_site: {len(found)} finding(s) in {args.site}", file=sys.stderr)
        return 1
    print(f"check_site: {args.site} reads as a site (file:// links, no raw roles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
