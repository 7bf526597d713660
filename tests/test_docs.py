"""The README and docs/ stand alone: every relative link points at a file (and heading) of this repository.

A user who clones alignd has only the repository, so a link outside it (the steering repo's
``../shared/DESIGN.md``) or to a file that moved is a dead end. Also: every ``ALIGND_*`` variable the
code reads is documented in docs/configuration.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "k8s" / "README.md"])
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def links(page: Path) -> list[str]:
    """Link targets of a Markdown page, outside fenced code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_the_link_reader_finds_links_and_skips_code() -> None:
    sample = REPO / "README.md"
    found = links(sample)
    assert "docs/configuration.md" in found and "docs/api.md" in found
    assert slug("Multi-node jobs (JobSet and Kueue)") == "multi-node-jobs-jobset-and-kueue"
    assert slug("`jobs follow`") == "jobs-follow"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_into_the_repository(page: Path) -> None:
    assert "../shared" not in page.read_text() and "shared/DESIGN" not in page.read_text()
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, broken


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    used = set()
    for root in ("service", "workers"):
        for source in (REPO / root).rglob("*.py"):
            used |= set(re.findall(r"[\"'](ALIGND_[A-Z0-9_]*[A-Z0-9])[\"']", source.read_text()))
    assert {"ALIGND_DATABASE_URL", "ALIGND_QUEUES", "ALIGND_HEARTBEAT_TIMEOUT"} <= used  # the reader works
    documented = set(re.findall(r"ALIGND_[A-Z0-9_]*[A-Z0-9]", (REPO / "docs" / "configuration.md").read_text()))
    assert not used - documented, sorted(used - documented)
