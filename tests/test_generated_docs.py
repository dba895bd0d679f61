"""Generated tables between marker comments in documentation pages."""

from __future__ import annotations

import pytest

from hf_taskarith.evaluation.generated_docs import generated_block, write_between_markers

MARKERS = ("<!-- t:begin (generated) -->", "<!-- t:end -->")


def test_write_replaces_only_the_block_and_reads_back(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nintro\n\n{MARKERS[0]}\n{MARKERS[1]}\n\nreading stays\n")
    assert generated_block(page, MARKERS) == ""
    write_between_markers(page, "| a |\n|---|\n| 1 |", MARKERS)
    assert generated_block(page, MARKERS) == "| a |\n|---|\n| 1 |"
    write_between_markers(page, "| b |", MARKERS)  # a second render replaces, never appends
    text = page.read_text()
    assert text == f"# Title\n\nintro\n\n{MARKERS[0]}\n| b |\n{MARKERS[1]}\n\nreading stays\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_block_with_regex_characters_is_written_verbatim(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"{MARKERS[0]}\n{MARKERS[1]}\n")
    block = r"| +2.0 [\1, $0] \g<0> |"
    write_between_markers(page, block, MARKERS)
    assert generated_block(page, MARKERS) == block


def test_missing_markers_are_an_error_and_nothing_is_written(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    with pytest.raises(ValueError, match="no '<!-- t:begin"):
        write_between_markers(page, "x", MARKERS)
    assert page.read_text() == "no markers here\n"
    with pytest.raises(ValueError, match="add the two marker lines"):
        generated_block(page, MARKERS)
