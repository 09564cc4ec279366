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
