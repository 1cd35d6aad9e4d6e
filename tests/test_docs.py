"""The documentation holds together: links resolve, every page is in the site's nav, the README stays
short and its loss example runs.

Pure-Python checks (no mkdocs needed), so they run with the rest of the suite; `make docs` builds the
site itself with `--strict`.
"""

import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import yaml

from conftest import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
# Folders under docs/ that hold assets (figures, result files), not pages.
ASSET_DIRS = ("img", "results")
MAX_README_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> List[Path]:
    pages = [README] + sorted(DOCS.rglob("*.md"))
    return [p for p in pages if not any(part in ASSET_DIRS for part in p.relative_to(REPO).parts[1:-1])]


def relative_links(path: Path) -> Iterator[Tuple[str, Path]]:
    """(link as written, file it points to) for every relative link outside code."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor on the same page
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        yield target, (path.parent / file_part).resolve()


class _IgnoreTags(yaml.SafeLoader):
    """SafeLoader that reads mkdocs' `!!python/name:...` and `!ENV` tags as plain values."""


def _untagged(loader, _suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)


_IgnoreTags.add_multi_constructor("", _untagged)


def mkdocs_config() -> dict:
    return yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_IgnoreTags)


def nav_pages(node) -> Iterator[str]:
    if isinstance(node, str):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", node):
            yield node
    elif isinstance(node, list):
        for item in node:
            yield from nav_pages(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from nav_pages(value)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(path):
    broken = [target for target, resolved in relative_links(path) if not resolved.exists()]
    assert not broken, f"{path.relative_to(REPO)} links to missing files: {broken}"


def test_the_link_checker_sees_links():
    # Guards the regexes: the README's map of the docs must be found, and code must be skipped.
    targets = [t for t, _ in relative_links(README)]
    assert "docs/getting-started.md" in targets
    assert not [t for t in targets if t.startswith("configs/")]


def test_every_page_is_in_the_nav():
    config = mkdocs_config()
    docs_dir = REPO / config.get("docs_dir", "docs")
    assert docs_dir == DOCS
    listed = set(nav_pages(config["nav"]))
    missing_files = sorted(p for p in listed if not (DOCS / p).is_file())
    assert not missing_files, f"mkdocs.yml's nav lists pages that do not exist: {missing_files}"
    pages = {p.relative_to(DOCS).as_posix() for p in markdown_files() if p != README}
    unlisted = sorted(pages - listed)
    assert not unlisted, f"pages missing from mkdocs.yml's nav: {unlisted}"


def test_the_pages_the_readme_points_to_exist():
    for page in ("index.md", "getting-started.md", "method.md", "data.md", "configuration.md", "architecture.md"):
        assert (DOCS / page).is_file(), page


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES})"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_loss_example_runs(capsys):
    code = first_python_block(README.read_text(encoding="utf-8"))
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md[python]", "exec"), namespace)
    assert "EAFT" in capsys.readouterr().out
    loss = namespace["loss"]
    assert loss.ndim == 0 and bool(loss.isfinite())
    assert namespace["logits"].grad is not None  # the example's backward reached the logits


def test_the_architecture_table_follows_the_layering_contract():
    # docs/architecture.md's layer table lists the folders top to bottom as pyproject.toml's layers
    # contract does, so the picture and the contract that CI checks cannot drift apart.
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    text = (DOCS / "architecture.md").read_text()
    section = text.split("| layer (top to bottom) |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in section.splitlines()[2:] if line.startswith("| ")]
    documented = [re.findall(r"`([a-z_]+)(?:/|\.py)`", row.split(" | ")[0]) for row in rows]
    want = [[name.strip() for name in layer.split("|")] for layer in layers]
    assert documented == want
