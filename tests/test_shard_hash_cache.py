"""The per-process base-shard hash memo (checkpoint.shard_sha256): read once per file version, never stale."""

from __future__ import annotations

import hashlib

from l4q_export import checkpoint as C


def _counting(monkeypatch) -> list[int]:
    calls = [0]
    real = C.sha256_file

    def counted(path, *a, **k):
        calls[0] += 1
        return real(path, *a, **k)

    monkeypatch.setattr(C, "sha256_file", counted)
    monkeypatch.setattr(C, "_SHARD_HASHES", {})
    return calls


def test_an_old_file_is_hashed_once(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    monkeypatch.setattr(C, "_RACY_SECONDS", -1.0)  # treat the file as long unchanged
    f = tmp_path / "s.safetensors"
    f.write_bytes(b"a" * 1000)
    want = hashlib.sha256(b"a" * 1000).hexdigest()
    assert C.shard_sha256(f) == want and C.shard_sha256(f) == want
    assert calls[0] == 1


def test_a_recently_changed_file_is_rehashed_and_a_rewrite_is_seen(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    f = tmp_path / "s.safetensors"
    f.write_bytes(b"a" * 1000)
    assert C.shard_sha256(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    f.write_bytes(b"b" * 1000)  # same size, possibly the same timestamp tick
    assert C.shard_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert calls[0] == 2
