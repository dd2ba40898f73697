"""The event vocabulary is written down twice for people (the table in harness/events.py and
docs/harness.md's "Event vocabulary"); both must list exactly the types the harness defines."""

from __future__ import annotations

import re

from corral.harness import events
from tests.harness.conftest import ROOT


def test_the_docstring_table_lists_exactly_the_event_types() -> None:
    assert events.__doc__ is not None
    table = events.__doc__.split("type                  data", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(r"^    ([a-z_]+\.[a-z_]+)\s", table, re.MULTILINE)
    assert sorted(documented) == sorted(events.EVENT_TYPES)


def test_the_docs_table_lists_exactly_the_event_types() -> None:
    page = (ROOT / "docs" / "harness.md").read_text()
    section = page.split("## Event vocabulary", 1)[1].split("\n#", 1)[0]
    documented = [
        t
        for row in section.splitlines()
        if row.startswith("| `")
        for t in re.findall(r"`([a-z_]+\.[a-z_]+)`", row.split("|")[1])
    ]
    assert sorted(documented) == sorted(events.EVENT_TYPES)


def test_the_constants_are_the_only_definitions() -> None:
    values = [v for k, v in vars(events).items() if k.isupper() and isinstance(v, str) and "." in v]
    assert sorted(values) == sorted(events.EVENT_TYPES) and len(set(values)) == len(values)
