"""The bdSeq counter file: one more per CONNECT, 0 after 255, kept across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.publishers.sparkplug.node import BdSeqFile


def test_counts_from_zero_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db.bdseq"
    first = BdSeqFile(path)
    assert [first.next() for _ in range(3)] == [0, 1, 2]
    assert BdSeqFile(path).next() == 3  # a new process reads the file


def test_wraps_after_255(tmp_path: Path) -> None:
    path = tmp_path / "bdseq"
    path.write_text("254\n")
    counter = BdSeqFile(path)
    assert [counter.next() for _ in range(3)] == [255, 0, 1]


@pytest.mark.parametrize("content", ["", "x\n", "300\n", "-4\n"])
def test_a_damaged_file_starts_again_at_zero(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bdseq"
    path.write_text(content)
    assert BdSeqFile(path).next() == 0
    assert path.read_text() == "0\n"


def test_keeps_counting_when_the_file_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counter = BdSeqFile(tmp_path / "missing-dir" / "bdseq")
    assert [counter.next() for _ in range(3)] == [0, 1, 2]
    assert len([r for r in caplog.records if "cannot save the Sparkplug bdSeq" in r.message]) == 1
