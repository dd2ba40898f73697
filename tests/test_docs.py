"""The reference pages that copy a source of truth are checked against it."""

from __future__ import annotations

from pathlib import Path

from corral.configdoc import render

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_page_is_generated_from_the_settings() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == render(), "docs/configuration.md is stale: run `python -m corral.configdoc > docs/configuration.md`"


def test_the_readme_links_resolve() -> None:
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [target for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme) if "://" not in target]
    assert links, "the README links its reference pages"
    missing = [target for target in links if not (ROOT / target).exists()]
    assert not missing, f"README links to missing files: {missing}"
