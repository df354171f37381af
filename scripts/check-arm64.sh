#!/usr/bin/env bash
# End-to-end check of edge-slm on aarch64, without ARM hardware.
#
# Why: the C kernel tests cross-build and run under qemu, but they cannot show
# that the *package* works on a board: that CMake picks the ARM kernel files
# and their -march flags, that the wheel builds with a board's compiler and
# Python, that dispatch chooses NEON, and that the whole forward pass still
# agrees with llama.cpp. So this builds and tests the current checkout the way
# a user on a Debian arm64 board would (`pip install .[test]` in a venv over
# Debian's numpy), inside an arm64 Debian bookworm root run by qemu-user
# through binfmt_misc.
#
# Usage: scripts/check-arm64.sh        (or `make arm64`)
#   Needs root (uses sudo otherwise), the network (Debian mirror, PyPI) and
#   the reference model on the host (`make setup` pulls it).
#   First run: ~10 min to debootstrap the root, which is then cached; every
#   run copies the checkout afresh and rebuilds the package from scratch, so
#   nothing stale is tested. Emulation is 10-50x slower than native, so the
#   test selection is kept small.
#
# Environment:
#   EDGE_SLM_ARM64_ROOT    cached arm64 root (default ~/.cache/edge-slm/arm64-root)
#   EDGE_SLM_ARM64_MIRROR  Debian mirror for debootstrap (default deb.debian.org)
#   EDGE_SLM_ARM64_TESTS   pytest arguments to run inside, read there as shell
#                          words (so quote a -k expression); default: the
#                          reference model's forward pass and parity, and the
#                          tiny models' parity for K-quants (DEFAULT_TESTS)
#   EDGE_SLM_PARITY_PROMPTS  prompts the parity test checks (default 2 here)
#   EDGE_SLM_HOME          where the host keeps the model (as edge_slm/paths.py)
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(realpath -m "${EDGE_SLM_ARM64_ROOT:-$HOME/.cache/edge-slm/arm64-root}")
MIRROR=${EDGE_SLM_ARM64_MIRROR:-http://deb.debian.org/debian}
# Besides the Q4_1 reference model, the tiny models of tests/fixtures/arch/,
# so the NEON tables run K-quants end to end: llama's Q4_K and Q6_K files and
# Gemma 3's Q4_K_M (Q4_K, Q6_K and Q8_0 in one model, with GELU, a sliding
# window and 256-wide heads), and each vocabulary's tokenization, whose F32
# models must hash as the fixture's under the board's numpy. -k filters every
# file given, so it names the first two files' tests too ("not test_arch_parity.py").
ARCH_TESTS="not test_arch_parity.py or llama-Q4_K or llama-Q6_K or gemma3-Q4_K_M or tokenization"
DEFAULT_TESTS="tests/test_forward.py tests/test_parity.py tests/test_arch_parity.py -k '$ARCH_TESTS'"
TESTS=${EDGE_SLM_ARM64_TESTS:-$DEFAULT_TESTS}
PARITY_PROMPTS=${EDGE_SLM_PARITY_PROMPTS:-2}
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf # edge_slm/paths.py MODEL_FILE
HOST_MODEL=${EDGE_SLM_HOME:-$HOME/.cache/edge-slm}/models/$MODEL_FILE
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

# The stamp records these arguments, so changing them rebuilds the root.
# Only what pip cannot provide comes from Debian: the compiler, the Python
# headers and the board's numpy; cmake and ninja come from PyPI wheels.
DEBOOTSTRAP_ARGS=(--arch=arm64 --variant=minbase
    --include=python3,python3-venv,python3-dev,python3-numpy,gcc,libc6-dev,ca-certificates
    bookworm)
STAMP=$ROOT/.edge-slm-arm64-root
VENV=/opt/edge-slm-venv # inside the root; kept while pyproject.toml is unchanged

case "$ROOT" in /|/root|/home|/tmp|"$HOME") echo "refusing EDGE_SLM_ARM64_ROOT=$ROOT" >&2; exit 2;; esac

# ---- phases, timing and the summary ----------------------------------------

LOGS=$(mktemp -d)
PHASE="" PHASE_T0=0
PHASE_NAMES=() PHASE_SECS=() PHASE_STATUS=()
T_START=$SECONDS

begin() { PHASE=$1; PHASE_T0=$SECONDS; printf '\n==> %s\n' "$1"; }
record() { PHASE_NAMES+=("$PHASE"); PHASE_SECS+=($((SECONDS - PHASE_T0))); PHASE_STATUS+=("$1"); PHASE=""; }
done_() { record ok; }

mounts_under_root() {
    awk -v r="$ROOT" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}

unmount_all() {
    local m
    for m in $(mounts_under_root); do
        $SUDO umount "$m" 2>/dev/null || $SUDO umount --lazy "$m"
    done
}

summary() {
    local rc=$? i
    [ -n "$PHASE" ] && record FAILED
    unmount_all || true
    printf '\n==> arm64 summary (root %s)\n' "$ROOT"
    for i in "${!PHASE_NAMES[@]}"; do
        printf '  %5ss  %-6s %s\n' "${PHASE_SECS[$i]}" "${PHASE_STATUS[$i]}" "${PHASE_NAMES[$i]}"
    done
    printf '  %5ss         total\n' $((SECONDS - T_START))
    [ -s "$LOGS/backends" ] && printf '  backends: %s\n' "$(cat "$LOGS/backends")"
    [ -s "$LOGS/complete" ] && printf '  complete: %s\n' "$(tail -n 1 "$LOGS/complete")"
    if [ -s "$LOGS/pytest" ]; then
        printf '  pytest:   %s\n' "$(tail -n 1 "$LOGS/pytest")"
        grep -E '^(parity|greedy|arch parity [^ ]+) \[' "$LOGS/pytest" | sed 's/^/    /' || true
    fi
    if [ "$rc" = 0 ]; then echo "arm64: PASS"; else echo "arm64: FAIL (exit $rc)"; fi
    rm -rf "$LOGS"
    exit "$rc"
}
trap summary EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a bash script inside the root with a clean, explicit environment.
# QEMU_CPU=max: qemu's default model may lack dotprod / i8mm, which would
# hide those kernels. PYTHONSAFEPATH: /src must not shadow the installed
# package (the source tree has no built _core).
in_root() {
    $SUDO chroot "$ROOT" /usr/bin/env -i \
        HOME=/root LANG=C.UTF-8 TERM=dumb \
        PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        QEMU_CPU=max PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1 \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_DEFAULT_TIMEOUT=180 PIP_PROGRESS_BAR=off \
        EDGE_SLM_HOME=/edge-slm-home EDGE_SLM_PARITY_PROMPTS="$PARITY_PROMPTS" \
        /bin/bash -euo pipefail -c "$1"
}

apt_install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# ---- 1. host tools and binfmt_misc -----------------------------------------

begin "host tools, binfmt_misc"
[ -f "$HOST_MODEL" ] || { echo "the reference model is missing at $HOST_MODEL: run make setup" >&2; exit 1; }
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "$(uname -m)" != aarch64 ]; then
    [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
fi
[ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
if [ "$(uname -m)" != aarch64 ]; then
    BINFMT=/proc/sys/fs/binfmt_misc
    [ -e $BINFMT/register ] || $SUDO mount -t binfmt_misc binfmt_misc $BINFMT
    # F: the kernel opens qemu now, so it need not exist inside the root.
    [ -e $BINFMT/qemu-aarch64 ] ||
        echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' |
        $SUDO tee $BINFMT/register >/dev/null
    grep -qx enabled $BINFMT/qemu-aarch64 || { echo "binfmt qemu-aarch64 is registered but disabled" >&2; exit 1; }
    grep -q '^flags:.*F' $BINFMT/qemu-aarch64 ||
        { echo "binfmt qemu-aarch64 lacks the F flag (it would need qemu inside the root); remove it: echo -1 > $BINFMT/qemu-aarch64" >&2; exit 1; }
fi
done_

# ---- 2. the arm64 root (cached) --------------------------------------------

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -n 9 || { echo "another check-arm64 run holds $ROOT.lock" >&2; exit 1; }
unmount_all # left by a run that was killed before its trap ran

begin "arm64 root (debootstrap)"
if [ "$($SUDO cat "$STAMP" 2>/dev/null)" != "${DEBOOTSTRAP_ARGS[*]} $MIRROR" ]; then
    echo "building $ROOT (about 10 minutes)"
    # --one-file-system and the unmount above: never delete through a bind mount.
    $SUDO rm -rf --one-file-system "$ROOT"
    $SUDO debootstrap "${DEBOOTSTRAP_ARGS[@]}" "$ROOT" "$MIRROR" ||
        { $SUDO tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2 || true; exit 1; }
    $SUDO chroot "$ROOT" apt-get clean
    echo "${DEBOOTSTRAP_ARGS[*]} $MIRROR" | $SUDO tee "$STAMP" >/dev/null
else
    echo "reusing $ROOT"
fi
done_

# ---- 3. mounts, sources, model ---------------------------------------------

begin "mounts, sources, model"
$SUDO mount -t proc proc "$ROOT/proc"
$SUDO mount --bind /dev "$ROOT/dev"
$SUDO touch "$ROOT/etc/resolv.conf"
$SUDO mount --bind /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's CA bundle, which may hold a local CA that Debian's lacks
# (a proxy between this machine and PyPI, say).
$SUDO cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"

# What would be committed plus untracked, non-ignored files: the work tree as
# it is now, without .venv, build/ or a host-built _core*.so.
$SUDO rm -rf --one-file-system "$ROOT/src"
$SUDO mkdir -p "$ROOT/src"
if git -c safe.directory="$SRC" -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -c safe.directory="$SRC" -C "$SRC" ls-files -z --cached --others --exclude-standard |
        (cd "$SRC" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) |
        tar -C "$SRC" --null -T - -cf - | $SUDO tar -C "$ROOT/src" -xf -
else
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' \
        --exclude=__pycache__ -cf - . | $SUDO tar -C "$ROOT/src" -xf -
fi
echo "copied $(find "$ROOT/src" -type f | wc -l) files from $SRC to $ROOT/src"

# A hard link when the cache shares the model's file system; cp -p otherwise.
# Either keeps the mtime, so pull's .verified sidecar still vouches for it.
$SUDO mkdir -p "$ROOT/edge-slm-home/models"
for f in "$HOST_MODEL" "$HOST_MODEL.verified"; do
    [ -e "$f" ] || continue
    $SUDO ln -f "$f" "$ROOT/edge-slm-home/models/" 2>/dev/null ||
        $SUDO cp -p "$f" "$ROOT/edge-slm-home/models/"
done
done_

# ---- 4. build and install inside -------------------------------------------

begin "pip install /src[test] (emulated)"
want=$(sha256sum "$SRC/pyproject.toml" | cut -c1-64)
in_root "
    uname -m; python3 --version; gcc --version | head -n 1
    if [ \"\$(cat $VENV/.pyproject.sha256 2>/dev/null)\" != $want ]; then
        rm -rf $VENV
        # the system's python by its path: bash has hashed python3 as the
        # venv's, which is gone now
        /usr/bin/python3 -m venv --system-site-packages $VENV
    fi
    # A local directory is always rebuilt from scratch (isolated build, new
    # build directory), so this compiles exactly the copied sources.
    pip install '/src[test]'
    echo $want > $VENV/.pyproject.sha256
"
done_

# ---- 5. checks -------------------------------------------------------------

begin "check: NEON backend chosen"
in_root "cd / && python -c '
import platform
from edge_slm import _core
b = _core.backends()
print(platform.machine(), b, _core.best_backend())
assert b and b[0].startswith(\"neon\"), f\"first backend is {b[0] if b else None}, expected a NEON one\"
'" | tee "$LOGS/backends"
done_

begin "check: edge-slm complete (real model)"
in_root "cd / && edge-slm complete --json 'The capital of France is' --max-tokens 8" | tee "$LOGS/complete"
python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert r["tokens"] and r["text"].strip(), f"empty continuation: {r}"
' "$LOGS/complete"
done_

begin "check: pytest -m 'not slow' $TESTS"
in_root "cd /src && python -m pytest -q -p no:cacheprovider --durations=8 -m 'not slow' $TESTS" | tee "$LOGS/pytest"
done_
