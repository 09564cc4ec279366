"""Checksums and records of qdquant.provenance (the record of a whole run:
tests/integration/test_pipeline.py)."""

import hashlib

from qdquant import provenance


def test_a_large_input_is_checksummed_by_its_size_head_and_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "WHOLE_HASH_BYTES", 100)
    monkeypatch.setattr(provenance, "PARTIAL_BYTES", 10)
    data = bytes(range(256)) * 2
    (tmp_path / "slide.tif").write_bytes(data)
    got = provenance.checksum(tmp_path / "slide.tif")
    assert got["sha256"] == hashlib.sha256(b"512" + data[:10] + data[-10:]).hexdigest()
    assert got["method"].startswith("size+first+last") and got["bytes"] == 512


def test_the_record_gives_the_start_the_workflow_noted(tmp_path):
    """started: the note of the run under way (the workflow writes it as it starts or resumes),
    not a guess from the outputs' times; None without a note; the note goes when the run ends."""
    from datetime import datetime

    folder = tmp_path / "results" / "provenance"
    assert provenance.run_start(folder) is None and provenance.run_facts()["started"] is None
    note = provenance.record_run_start(folder)
    started = provenance.run_start(folder)
    facts = provenance.run_facts(started)
    assert note.parent == folder and facts["started"] == started
    assert datetime.fromisoformat(started) <= datetime.fromisoformat(facts["finished"])
    provenance.clear_run_start(folder)
    assert provenance.run_start(folder) is None and not list(folder.iterdir())
    provenance.clear_run_start(folder)  # already gone: nothing to do
