"""Output files (logits --npy, bench --json, soak --json) on hostile targets:
symlinks, FIFOs, device nodes, a planted temporary name. Each is refused in
one line before anything is written, and the file it points at is untouched."""

from __future__ import annotations

import os
import stat
import subprocess

import numpy as np
import pytest
from test_cli import assert_one_line, edge_slm

from edge_slm.errors import EdgeSlmError
from edge_slm.paths import output_file

# Each command, writing to TARGET; small settings, so that code which failed
# to refuse early would still finish (or time out) in seconds.
COMMANDS = {
    "logits": ["logits", "--ids", "1,2,3", "--npy", "TARGET"],
    "bench": ["bench", "--no-peer", "--reps", "1", "--threads", "1", "--kernels", "ref",
              "--json", "TARGET"],
    "soak": ["soak", "--slots", "1", "--requests", "4", "--json", "TARGET"],
}


def write_to(command: str, target, model) -> subprocess.CompletedProcess:
    args = [str(target) if a == "TARGET" else a for a in COMMANDS[command]]
    return edge_slm(*args, "--model", str(model), timeout=60)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_a_symlink_target_is_refused_and_what_it_names_untouched(command, tiny_model, tmp_path,
                                                                  victim):
    target = tmp_path / "out"
    target.symlink_to(victim)
    proc = write_to(command, target, tiny_model)
    assert_one_line(proc, 1, "symlink", str(target))
    assert victim.read_text() == "precious\n"
    assert target.is_symlink() and os.readlink(target) == str(victim)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_fifo_target_is_refused_without_opening_it(command, tiny_model, tmp_path):
    target = tmp_path / "out"
    os.mkfifo(target)
    proc = write_to(command, target, tiny_model)  # opening it to write would block: the timeout
    assert_one_line(proc, 1, "FIFO")
    assert stat.S_ISFIFO(target.lstat().st_mode)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_device_node_target_is_refused(command, tiny_model, tmp_path):
    """A node with /dev/null's numbers, made here: a rename over the real one
    as root would replace it with a regular file."""
    rdev = os.stat("/dev/null").st_rdev
    target = tmp_path / "null"
    try:
        os.mknod(target, stat.S_IFCHR | 0o666, rdev)
    except PermissionError:
        pytest.skip("device nodes cannot be made here")
    proc = write_to(command, target, tiny_model)
    assert_one_line(proc, 1, "device")
    st = target.lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev


def test_a_planted_part_symlink_is_not_written_through(tiny_model, tmp_path, victim):
    """The temporary name was once TARGET.part: whoever could write the folder
    could plant a symlink there and have the logits overwrite its target."""
    target = tmp_path / "logits.npy"
    planted = tmp_path / "logits.npy.part"
    planted.symlink_to(victim)
    proc = write_to("logits", target, tiny_model)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious\n"
    assert np.load(target).shape[0] == 3  # one row of logits per id
    assert not target.is_symlink() and planted.is_symlink()
    # no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.npy", "logits.npy.part",
                                                          "victim.txt"]


def test_the_output_file_gets_the_usual_mode(tiny_model, tmp_path):
    """mkstemp makes a private file; an output file is made as open() would make it."""
    target = tmp_path / "logits.npy"
    proc = write_to("logits", target, tiny_model)
    assert proc.returncode == 0, proc.stderr
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_failed_body_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old\n")
    with pytest.raises(KeyError):
        with output_file(target) as f:
            f.write(b"half a new fi")
            raise KeyError("the run failed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_target_that_became_a_symlink_during_the_run_is_refused(tmp_path, victim):
    """Checked again before the rename: a run can take hours."""
    target = tmp_path / "report.json"
    with pytest.raises(EdgeSlmError, match="symlink"):
        with output_file(target) as f:
            f.write(b"{}\n")
            target.symlink_to(victim)
    assert victim.read_text() == "precious\n" and target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "victim.txt"]
