"""The Raspberry Pi kiosk's scripts, run for real. open-kiosk waits for a
local HTTP server that answers 503 and then 200, then execs a stand-in
browser (a script that records its pid and argv: the browser is not under
test, the wait-and-launch is), with curl, wget or python3 alone on PATH.
install-autostart edits a throwaway home's labwc and wayfire configuration,
and --uninstall must give back every file byte for byte."""

from __future__ import annotations

import atexit
import configparser
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from firmware_bridge.broker import free_port

EDGE_SLM = str(Path(sys.executable).with_name("edge-slm"))
KIOSK = Path(__file__).resolve().parent.parent / "scripts" / "kiosk"


def _reachable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


if os.geteuid() == 0 and not _reachable_by_others(KIOSK):
    # As root the scripts run as nobody, who cannot reach a checkout in a
    # private folder (a clone under `mktemp -d`): a copy of them, where it can.
    _copy = Path(tempfile.mkdtemp(prefix="kiosk-scripts-"))
    _copy.chmod(0o755)
    KIOSK = Path(shutil.copytree(KIOSK, _copy / "kiosk"))
    atexit.register(shutil.rmtree, _copy, True)
OPEN_KIOSK = KIOSK / "open-kiosk"
INSTALL = KIOSK / "install-autostart"
MARK = "# edge-slm kiosk: added by install-autostart"
NOBODY = 65534


# --- open-kiosk --------------------------------------------------------------

class Health(ThreadingHTTPServer):
    """GET /healthz answers 503 for the first `not_ready` hits, then 200;
    any other path is 404, so a wrong health address never becomes ready."""

    def __init__(self, not_ready: int):
        self.not_ready = not_ready
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(h):  # noqa: N805 (h: the handler; self is the server)
                if h.path != "/healthz":
                    h.send_error(404)
                    return
                self.hits += 1
                ready = self.hits > self.not_ready
                body = b'{"status": "ok"}' if ready else b'{"status": "loading"}'
                h.send_response(200 if ready else 503)
                h.send_header("content-type", "application/json")
                h.send_header("content-length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)

            def log_message(h, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture
def health():
    servers: list[Health] = []

    def start(not_ready: int) -> Health:
        server = Health(not_ready)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def tools(tmp_path: Path, *names: str) -> Path:
    """A PATH directory holding only what the script needs and `names`: the
    board's curl, wget or python3 is then the one it must use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("date", "sleep", "mkdir", *names):
        # python3 on PATH may be a wrapper (pyenv); this interpreter is a real one
        src = os.path.realpath(sys.executable) if name == "python3" else shutil.which(name)
        if src is None:
            pytest.skip(f"{name} is not installed")
        (bin_dir / name).symlink_to(src)
    return bin_dir


def browser(bin_dir: Path, name: str = "chromium-browser") -> Path:
    """A stand-in browser in `bin_dir`: writes its pid, then one argument a line."""
    record = bin_dir.parent / "browser-started"
    exe = bin_dir / name
    exe.write_text(f'#!/bin/sh\n{{ echo "$$"; for a; do echo "$a"; done; }} > {shlex.quote(str(record))}\n')
    exe.chmod(0o755)
    return record


def open_kiosk(tmp_path: Path, bin_dir: Path, **env: str) -> tuple[int, int, str]:
    """(pid, exit status, stderr) of one run of open-kiosk, which has 10 s
    to see the server ready unless `env` says otherwise."""
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path / "home"), "EDGE_SLM_KIOSK_WAIT_S": "10", **env}
    with subprocess.Popen([str(OPEN_KIOSK)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as started:
        try:
            _, err = started.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            started.kill()
            raise
    return started.pid, started.returncode, err


@pytest.mark.parametrize("client", ["curl", "wget", "python3"])
def test_waits_for_200_then_execs_the_browser(tmp_path, health, client):
    server = health(not_ready=1)
    bin_dir = tools(tmp_path, client)
    record = browser(bin_dir)
    pid, code, err = open_kiosk(tmp_path, bin_dir, EDGE_SLM_KIOSK_URL=server.url, WAYLAND_DISPLAY="wayland-0")
    assert code == 0, err
    assert server.hits == 2  # a 503, then the 200 it launched on
    recorded_pid, *argv = record.read_text().splitlines()
    assert int(recorded_pid) == pid  # exec'd: the compositor's child is the browser itself
    assert argv[-1] == server.url
    assert {"--kiosk", "--noerrdialogs", "--no-first-run", "--hide-crash-restore-bubble",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--ozone-platform=wayland"} <= set(argv)
    profile = tmp_path / "home" / ".cache" / "edge-slm-kiosk"
    assert f"--user-data-dir={profile}" in argv and profile.is_dir()
    assert len(argv) == len(set(argv))


def test_health_is_the_pages_origin_and_the_overrides_are_used(tmp_path, health):
    server = health(not_ready=0)
    bin_dir = tools(tmp_path, "curl")
    record = browser(bin_dir, "my-browser")
    page = server.url + "kiosk/page?machine=pump-7"
    _, code, err = open_kiosk(tmp_path, bin_dir, EDGE_SLM_KIOSK_URL=page, EDGE_SLM_BROWSER="my-browser",
                              XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert code == 0, err
    argv = record.read_text().splitlines()[1:]
    assert server.hits == 1 and argv[-1] == page
    assert f"--user-data-dir={tmp_path / 'cache' / 'edge-slm-kiosk'}" in argv
    assert not any(a.startswith("--ozone-platform") for a in argv)  # not under Wayland: X11's default


@pytest.mark.parametrize("listening", [True, False], ids=["503-forever", "nothing-listening"])
def test_gives_up_after_the_wait_with_one_clear_line(tmp_path, health, listening):
    if listening:
        url = health(not_ready=10**9).url
    else:
        url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    bin_dir = tools(tmp_path, "curl")
    record = browser(bin_dir)
    t0 = time.monotonic()
    _, code, err = open_kiosk(tmp_path, bin_dir, EDGE_SLM_KIOSK_URL=url, EDGE_SLM_KIOSK_WAIT_S="1")
    assert code == 1
    assert time.monotonic() - t0 < 6
    assert err.splitlines()[-1].startswith(f"open-kiosk: {url}healthz did not answer 200 within 1 s")
    assert not record.exists()


def test_waits_for_the_real_kiosk(tmp_path, real_model):
    """The contract with edge-slm kiosk itself: /healthz on the page's origin."""
    port = free_port()
    kiosk = subprocess.Popen([EDGE_SLM, "kiosk", "--model", str(real_model), "--port", str(port),
                              "--slots", "1", "--ctx", "256"],
                             env={**os.environ, "EDGE_SLM_HOME": str(tmp_path / "state")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        bin_dir = tools(tmp_path, "curl")
        record = browser(bin_dir)
        url = f"http://127.0.0.1:{port}/"
        _, code, err = open_kiosk(tmp_path, bin_dir, EDGE_SLM_KIOSK_URL=url, EDGE_SLM_KIOSK_WAIT_S="60")
        assert code == 0, err
        assert record.read_text().splitlines()[-1] == url
    finally:
        kiosk.send_signal(signal.SIGTERM)
        kiosk.communicate(timeout=30)


def test_without_a_browser_it_fails_at_once(tmp_path, health):
    server = health(not_ready=0)
    bin_dir = tools(tmp_path, "curl")
    _, code, err = open_kiosk(tmp_path, bin_dir, EDGE_SLM_KIOSK_URL=server.url)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("open-kiosk: no browser: neither chromium-browser nor chromium is on PATH")
    assert server.hits == 0  # before any waiting
    _, code, err = open_kiosk(tmp_path, bin_dir, EDGE_SLM_KIOSK_URL=server.url,
                              EDGE_SLM_BROWSER=str(tmp_path / "no-such-browser"))
    assert code == 1 and "EDGE_SLM_BROWSER=" in err and "no-such-browser" in err


@pytest.mark.parametrize("env, words", [
    ({}, "no curl, wget or python3"),
    ({"EDGE_SLM_KIOSK_WAIT_S": "5m"}, "EDGE_SLM_KIOSK_WAIT_S=5m is not a whole number"),
    ({"EDGE_SLM_KIOSK_URL": "127.0.0.1:8080"}, "is not an http:// or https:// address"),
])
def test_what_it_cannot_work_with_is_one_line(tmp_path, env, words):
    bin_dir = tools(tmp_path)  # no HTTP client
    browser(bin_dir)
    _, code, err = open_kiosk(tmp_path, bin_dir, **env)
    assert code == 1 and err.count("\n") == 1 and words in err, err


# --- install-autostart -------------------------------------------------------

@pytest.fixture
def home():
    """A desktop user's home with ~/.config. As root, the script runs as
    nobody (it refuses root), so the home is nobody's and outside pytest's
    root-only temporary directory."""
    path = Path(tempfile.mkdtemp(prefix="kiosk-home-"))
    (path / ".config").mkdir()
    yield path
    shutil.rmtree(path)


def install(home: Path, *args: str, script: Path = INSTALL, as_root: bool = False) -> subprocess.CompletedProcess:
    prefix: list[str] = []
    if os.geteuid() == 0 and not as_root:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop to a desktop user")
        for p in [home, *home.rglob("*")]:
            os.lchown(p, NOBODY, NOBODY)
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    return subprocess.run([*prefix, str(script), *args], env=env, capture_output=True, text=True, timeout=30)


def snapshot(home: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and directory under ~/.config: content (None for a
    directory) and permission bits."""
    config = home / ".config"
    return {str(p.relative_to(config)): (None if p.is_dir() else p.read_bytes(), stat.S_IMODE(p.lstat().st_mode))
            for p in [config, *config.rglob("*")]}


def labwc_lines(home: Path) -> list[str]:
    return (home / ".config" / "labwc" / "autostart").read_text().splitlines()


def wayfire(home: Path) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string((home / ".config" / "wayfire.ini").read_text())
    return ini


def check_installed(home: Path) -> None:
    lines = labwc_lines(home)
    marks = [i for i, line in enumerate(lines) if line.startswith(MARK)]
    assert len(marks) == 1 and lines[marks[0] + 1] == f"{OPEN_KIOSK} &"
    assert wayfire(home)["autostart"]["edge_slm_kiosk"] == str(OPEN_KIOSK)
    assert (home / ".config" / "wayfire.ini").read_text().count(MARK) == 1


def test_fresh_desktop_install_twice_then_uninstall(home):
    before = snapshot(home)
    done = install(home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"labwc: added to {home}/.config/labwc/autostart",
                                        f"wayfire: added to {home}/.config/wayfire.ini"]
    check_installed(home)
    assert labwc_lines(home)[1] == f"{OPEN_KIOSK} &"
    # what labwc runs is a shell script: it must parse
    assert subprocess.run(["sh", "-n", str(home / ".config" / "labwc" / "autostart")]).returncode == 0
    installed = snapshot(home)

    again = install(home)
    assert again.returncode == 0 and "already in" in again.stdout
    assert snapshot(home) == installed

    removed = install(home, "--uninstall")
    assert removed.returncode == 0 and removed.stdout.count("removed from") == 2
    assert snapshot(home) == before  # the files and the labwc directory it made are gone
    nothing = install(home, "--uninstall")
    assert nothing.returncode == 0 and nothing.stdout.count("nothing to remove") == 2
    assert snapshot(home) == before


# (labwc autostart, wayfire.ini) as a board may have them; None: no such file
EXISTING = {
    "pi-os-like": ("/usr/bin/kanshi &\n",
                   "[core]\nplugins = autostart\n\n[autostart]\npanel = wfrespawn wf-panel-pi\n\n"
                   "[input]\nxkb_layout = gb\n"),
    "no-final-newline": ("/usr/bin/kanshi &", "[input]\nxkb_layout = gb"),
    "header-last-no-newline": ("\n", "[core]\nplugins = autostart\n[autostart]"),
    "empty-files": ("", ""),
    "labwc-dir-but-no-file": (None, "[input]\nxkb_layout = gb\n"),
}


@pytest.mark.parametrize("labwc, ini", EXISTING.values(), ids=EXISTING.keys())
def test_existing_configuration_comes_back_byte_for_byte(home, labwc, ini):
    config = home / ".config"
    (config / "labwc").mkdir()
    if labwc is not None:
        (config / "labwc" / "autostart").write_text(labwc)
        (config / "labwc" / "autostart").chmod(0o755)
    (config / "wayfire.ini").write_text(ini)
    (config / "wayfire.ini").chmod(0o640)
    before = snapshot(home)
    theirs = wayfire(home)
    others = {section: dict(theirs[section]) for section in theirs.sections()}

    assert install(home).returncode == 0
    check_installed(home)
    after = wayfire(home)
    for section, values in others.items():  # nothing of theirs lost or moved to another section
        assert {k: v for k, v in after[section].items() if k != "edge_slm_kiosk"} == values
    installed = snapshot(home)
    assert {k: mode for k, (_, mode) in installed.items() if k in before} == \
           {k: mode for k, (_, mode) in before.items()}  # modes kept

    assert install(home).returncode == 0
    assert snapshot(home) == installed
    assert install(home, "--uninstall").returncode == 0
    assert snapshot(home) == before


def test_lines_added_after_ours_survive_uninstall(home):
    assert install(home).returncode == 0
    autostart, ini = home / ".config" / "labwc" / "autostart", home / ".config" / "wayfire.ini"
    with autostart.open("a") as f:
        f.write("/usr/bin/squeekboard &\n")
    with ini.open("a") as f:
        f.write("keyboard = squeekboard\n")
    assert install(home, "--uninstall").returncode == 0
    assert autostart.read_text() == "/usr/bin/squeekboard &\n"
    # the [autostart] header it made stays: someone else's setting is under it now
    assert ini.read_text() == "[autostart]\nkeyboard = squeekboard\n"


def test_a_moved_checkout_updates_the_entry_in_place(home):
    moved = home / "elsewhere" / "kiosk"
    shutil.copytree(KIOSK, moved)
    before = snapshot(home)
    assert install(home).returncode == 0
    updated = install(home, script=moved / "install-autostart")
    assert updated.returncode == 0 and updated.stdout.count("updated in") == 2, updated.stderr
    assert labwc_lines(home)[-1] == f"{moved / 'open-kiosk'} &"
    assert wayfire(home)["autostart"]["edge_slm_kiosk"] == str(moved / "open-kiosk")
    assert install(home, "--uninstall").returncode == 0
    assert snapshot(home) == before


def test_one_compositor_alone(home):
    assert install(home, "--labwc").returncode == 0
    assert (home / ".config" / "labwc" / "autostart").exists()
    assert not (home / ".config" / "wayfire.ini").exists()


def test_refusals_are_one_line_and_change_nothing(home):
    shutil.rmtree(home / ".config")
    done = install(home)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "/.config does not exist: run this as the user the desktop logs in as" in done.stderr
    assert list(home.iterdir()) == []
    assert install(home, "--kiosk").returncode == 2
    if os.geteuid() == 0:
        (home / ".config").mkdir()
        done = install(home, as_root=True)
        assert done.returncode == 1 and "not as root" in done.stderr
        assert list((home / ".config").iterdir()) == []


# --- both --------------------------------------------------------------------

@pytest.mark.parametrize("script", [OPEN_KIOSK, INSTALL], ids=lambda p: p.name)
def test_scripts_are_executable_posix_sh(script):
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        checked = subprocess.run([shellcheck, "--shell=sh", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout
