"""Fleet updates on one board: keys, signed bundles, the checks a manifest
must pass, the A/B slots with their trial and rollback, and the commands.

Hostile bundles are built by hand (tarfile, edited bytes) and signed with
the test's own key where the point is that a valid signature is not enough.
The real model is packed once per module; a tiny random model of the same
name stands for a fine-tune that loads but cannot answer."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from dataclasses import replace

import edge_slm
from edge_slm.errors import EdgeSlmError
from edge_slm.fleet.board import MAX_TRIAL_STARTS, POINTER, Board, Pointer, install
from edge_slm.fleet.bundle import (DEFAULT_GOLDEN, MANIFEST, MAX_MANIFEST, MEMBERS, MODEL, SIGNATURE,
                                   BundleError, Manifest, load_golden, open_bundle, pack, verify_model)
from edge_slm.fleet.keys import (PRIVATE_FILE, PUBLIC_FILE, KeyFileError, generate, key_id, load_private,
                                 load_public, raw_public, trusted_keys)
from test_cli import assert_one_line

NAME = "pump-assistant"
BIN = Path(sys.executable).parent
DAY = 86400


# ---- keys, bundles and boards for the tests ----

@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("keys")
    private, public = generate(folder)
    return SimpleNamespace(folder=folder, private_path=private, public_path=public,
                           private=load_private(private), trusted=trusted_keys(folder),
                           id=key_id(raw_public(load_public(public))))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """A key no board in these tests trusts."""
    private, _ = generate(tmp_path_factory.mktemp("stranger"))
    return load_private(private)


@pytest.fixture(scope="module")
def real_bundles(real_model, keypair, tmp_path_factory) -> dict[int, tuple[Path, Manifest]]:
    """The reference model packed as v1 and v2 of NAME (the same bytes)."""
    folder = tmp_path_factory.mktemp("bundles")
    made = {}
    for version in (1, 2):
        path = folder / f"{NAME}-{version}.bundle"
        made[version] = path, pack(real_model, path, name=NAME, version=version, private_key=keypair.private)
    return made


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model, keypair, tmp_path_factory) -> tuple[Path, Manifest]:
    """A random model packed as v2 of NAME: it loads, but fails the golden prompts."""
    path = tmp_path_factory.mktemp("tiny-bundle") / "tiny.bundle"
    return path, pack(tiny_model, path, name=NAME, version=2, private_key=keypair.private)


@pytest.fixture
def board(tmp_path):
    b = Board(tmp_path / "fleet")
    yield b
    b.close()


def manifest_for(model: bytes, signer, **changes) -> Manifest:
    """A manifest for `model` signed (claimed) by `signer`, with `changes`; not checked."""
    now = time.time()
    fields = dict(name=NAME, version=1, sha256=hashlib.sha256(model).hexdigest(), size=len(model),
                  architecture="llama", tensor_types={"Q4_1": 1}, min_runtime=edge_slm.__version__,
                  memory_bytes=1 << 20, created=now, expires=now + DAY,
                  key_id=key_id(raw_public(signer.public_key())))
    return Manifest(**{**fields, **changes})


def member(name: str, payload: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type, info.linkname = len(payload), 0o644, kind, link
    return info, payload


def signed_members(signer, model: bytes = b"GGUF" + bytes(1000), manifest: Manifest | None = None,
                   data: bytes | None = None) -> list:
    """manifest.json (given, or made for `model`), its signature by `signer`, model.gguf."""
    data = data if data is not None else (manifest or manifest_for(model, signer)).to_bytes()
    return [member(MANIFEST, data), member(SIGNATURE, signer.sign(data)), member(MODEL, model)]


def write_tar(path: Path, members: list) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return path


def refused(path: Path, trusted: dict, *needles: str) -> str:
    """open_bundle refuses `path` with a BundleError holding every needle."""
    with pytest.raises(BundleError) as e:
        open_bundle(path, trusted)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def edit(path: Path, out: Path, at: int, old: bytes, new: bytes) -> Path:
    """A copy of `path` with the bytes `old` at offset `at` replaced by `new` (same length)."""
    data = bytearray(path.read_bytes())
    assert data[at:at + len(old)] == old and len(new) == len(old)
    data[at:at + len(old)] = new
    out.write_bytes(data)
    return out


def offsets(path: Path) -> dict[str, int]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: m.offset_data for m in tar.getmembers()}


def flip_model_byte(path: Path, out: Path) -> Path:
    """`path` with one byte of its model.gguf flipped: the signature still checks."""
    at = offsets(path)[MODEL] + 5000
    byte = path.read_bytes()[at:at + 1]
    return edit(path, out, at, byte, bytes([byte[0] ^ 0xFF]))


def commit_by_hand(board: Board, slot: str, m: Manifest, tmp_path: Path) -> None:
    """Put `m` (with a stand-in model file) in `slot`, switch to it and commit:
    the board state the floor and pointer tests start from, without a golden run."""
    stand_in = tmp_path / f"stand-in-{slot}.gguf"
    stand_in.write_bytes(b"GGUF")
    board.place(slot, stand_in, m)
    board.switch(slot, "by hand")
    board.commit()


# ---- 1. keys ----

def test_keygen_private_key_is_owner_only_never_overwritten_and_loads(tmp_path):
    private, public = generate(tmp_path / "k")
    assert (private.name, public.name) == (PRIVATE_FILE, PUBLIC_FILE)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(KeyFileError, match="already exists") as e:
        generate(tmp_path / "k")
    assert "\n" not in str(e.value)
    assert (private.read_bytes(), public.read_bytes()) == before
    key, pub = load_private(private), load_public(public)
    pub.verify(key.sign(b"bundle"), b"bundle")  # the pair belongs together
    assert key_id(raw_public(key.public_key())) == key_id(raw_public(pub))
    assert len(key_id(raw_public(pub))) == 16
    with pytest.raises(KeyFileError, match="not a private key"):
        load_private(public)
    with pytest.raises(KeyFileError, match="not a public key"):
        load_public(private)


def test_trusted_keys_refuse_a_folder_without_keys(tmp_path, keypair):
    with pytest.raises(KeyFileError, match="no folder of trusted keys"):
        trusted_keys(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match="holds no public key"):
        trusted_keys(tmp_path / "empty")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.pub").write_text("this is not a key\n")
    with pytest.raises(KeyFileError, match="notes.pub: not a public key") as e:
        trusted_keys(odd)
    assert "\n" not in str(e.value)
    shutil.copy(keypair.private_path, odd / "notes.pub")  # a private key by a public name
    with pytest.raises(KeyFileError, match="notes.pub: not a public key"):
        trusted_keys(odd)
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(keypair.public_path, good / "operator.pub")
    (good / "README").write_text("only *.pub files are keys")
    assert list(trusted_keys(good)) == [keypair.id]


# ---- 2. the round trip ----

def test_pack_open_verify_round_trip(real_model, real_bundles, keypair):
    path, packed = real_bundles[1]
    with tarfile.open(path, "r:") as tar:  # uncompressed, exactly the three files, in order
        members = tar.getmembers()
    assert [m.name for m in members] == list(MEMBERS) and all(m.isreg() for m in members)
    opened = open_bundle(path, keypair.trusted)
    m = opened.manifest
    assert m == packed
    assert (m.name, m.version, m.rollback, m.min_runtime) == (NAME, 1, False, edge_slm.__version__)
    assert m.sha256 == hashlib.sha256(real_model.read_bytes()).hexdigest()
    assert m.size == real_model.stat().st_size == opened.model_size
    assert m.architecture == "llama"
    assert m.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert m.memory_bytes > m.size  # the weights and then some: KV cache, buffers
    assert m.expires > m.created and m.expires - m.created == pytest.approx(365 * DAY)
    assert abs(m.created - time.time()) < 600
    assert m.key_id == keypair.id
    assert m.golden == [dict(g) for g in DEFAULT_GOLDEN] and len(m.golden) == 4
    verify_model(opened)  # the model's bytes match
    with open(path, "rb") as f:
        f.seek(opened.model_offset)
        assert f.read(4) == b"GGUF"


def test_pack_carries_the_operators_golden_prompts_and_expiry(tiny_model, keypair, tmp_path):
    golden_file = tmp_path / "golden.json"
    golden = [{"question": "What does E42 mean?", "must_contain": ["filter", "clogged"]}]
    golden_file.write_text(json.dumps(golden))
    m = pack(tiny_model, tmp_path / "b", name=NAME, version=7, private_key=keypair.private,
             golden=load_golden(golden_file), expires_days=0.5, rollback=True)
    opened = open_bundle(tmp_path / "b", keypair.trusted)
    assert opened.manifest == m
    assert (m.golden, m.version, m.rollback) == (golden, 7, True)
    assert m.expires - m.created == pytest.approx(DAY / 2)


@pytest.mark.parametrize("text", ["[]", "{", '[{"question": "q"}]', '[{"question": "", "must_contain": ["x"]}]',
                                  '[{"question": "q", "must_contain": []}]', json.dumps([DEFAULT_GOLDEN[0]] * 33)])
def test_load_golden_refuses_a_bad_file(tmp_path, text):
    path = tmp_path / "golden.json"
    path.write_text(text)
    with pytest.raises(BundleError, match="golden"):
        load_golden(path)


def test_pack_refuses_a_file_edge_slm_cannot_run(tmp_path, keypair):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(EdgeSlmError):
        pack(junk, tmp_path / "junk.bundle", name=NAME, version=1, private_key=keypair.private)
    assert not (tmp_path / "junk.bundle").exists()


# ---- 3. what open_bundle and verify_model refuse ----

def test_a_hand_built_bundle_opens(tmp_path, keypair):
    """The control for the hostile bundles below: they differ from this one only
    in what each test changes."""
    model = b"GGUF" + bytes(1000)
    opened = open_bundle(write_tar(tmp_path / "b", signed_members(keypair.private, model)), keypair.trusted)
    assert opened.manifest == manifest_for(model, keypair.private, created=opened.manifest.created,
                                           expires=opened.manifest.expires)
    verify_model(opened)


def test_changed_manifest_bytes_fail_the_signature(tiny_bundle, keypair, tmp_path):
    path, _ = tiny_bundle
    at = path.read_bytes().index(b'"version":2')
    bumped = edit(path, tmp_path / "bumped", at, b'"version":2', b'"version":9')
    refused(bumped, keypair.trusted, "signature does not check")
    sig_at = offsets(path)[SIGNATURE]
    byte = path.read_bytes()[sig_at:sig_at + 1]
    bad_sig = edit(path, tmp_path / "sig", sig_at, byte, bytes([byte[0] ^ 1]))
    refused(bad_sig, keypair.trusted, "signature does not check")


def test_changed_model_bytes_fail_verify_model(tiny_bundle, keypair, tmp_path):
    path, _ = tiny_bundle
    tampered = flip_model_byte(path, tmp_path / "tampered")
    opened = open_bundle(tampered, keypair.trusted)  # the manifest is still good
    with pytest.raises(BundleError, match="does not match the manifest's sha256"):
        verify_model(opened)


def test_a_stranger_key_is_not_trusted(tmp_path, keypair, stranger):
    refused(write_tar(tmp_path / "b", signed_members(stranger)), keypair.trusted, "does not trust")
    # claiming the trusted key's id does not help
    forged = signed_members(stranger, manifest=manifest_for(b"GGUF" + bytes(1000), keypair.private))
    refused(write_tar(tmp_path / "forged", forged), keypair.trusted, "signature does not check")


@pytest.mark.parametrize("name", ["../evil", "/etc/x", "./model.gguf", "slot-a/model.gguf"])
def test_a_member_with_a_path_is_refused(tmp_path, keypair, name):
    manifest, sig, (_, model) = signed_members(keypair.private)
    refused(write_tar(tmp_path / "b", [manifest, sig, member(name, model)]), keypair.trusted, name)
    refused(write_tar(tmp_path / "c", [manifest, sig, member(MODEL, model), member(name, b"x")]),
            keypair.trusted, name)


def test_extra_missing_or_repeated_members_are_refused(tmp_path, keypair):
    manifest, sig, model = signed_members(keypair.private)
    for i, members in enumerate([[manifest, sig, model, member("README", b"hello")],
                                 [manifest, manifest, sig, model], [manifest, sig, model, model],
                                 [manifest, sig]]):
        refused(write_tar(tmp_path / f"b{i}", members), keypair.trusted, "a bundle holds exactly")


@pytest.mark.parametrize("order", [(1, 0, 2), (2, 0, 1), (0, 2, 1)])
def test_members_in_another_order_are_refused(tmp_path, keypair, order):
    members = signed_members(keypair.private)
    refused(write_tar(tmp_path / "b", [members[i] for i in order]), keypair.trusted, "a bundle holds exactly")


@pytest.mark.parametrize("which", [MANIFEST, SIGNATURE, MODEL])
@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])
def test_a_member_that_is_not_a_regular_file_is_refused(tmp_path, keypair, which, kind):
    members = [member(which, kind=kind, link="/etc/passwd") if name == which else (info, payload)
               for (info, payload), name in zip(signed_members(keypair.private), MEMBERS)]
    refused(write_tar(tmp_path / "b", members), keypair.trusted, "not a file")


def test_a_compressed_bundle_is_refused(tmp_path, keypair):
    good = write_tar(tmp_path / "good", signed_members(keypair.private))
    zipped = tmp_path / "zipped"
    zipped.write_bytes(gzip.compress(good.read_bytes()))
    with tarfile.open(zipped, "r:*") as tar:  # a good bundle inside: only the compression is wrong
        assert tar.getnames() == list(MEMBERS)
    refused(zipped, keypair.trusted, "not a bundle (an uncompressed tar)")


@pytest.mark.parametrize("size, ok", [(MAX_MANIFEST, True), (MAX_MANIFEST + 1, False), (10 * MAX_MANIFEST, False)])
def test_manifest_size_limit(tmp_path, keypair, size, ok):
    model = b"GGUF" + bytes(1000)
    data = manifest_for(model, keypair.private).to_bytes()
    data += b" " * (size - len(data))  # still JSON, validly signed: only the size is wrong
    path = write_tar(tmp_path / "b", signed_members(keypair.private, model, data=data))
    if ok:
        assert open_bundle(path, keypair.trusted).manifest.size == len(model)
    else:
        refused(path, keypair.trusted, f"manifest.json is {size} bytes", str(MAX_MANIFEST))


def test_a_truncated_bundle_is_refused(tmp_path, keypair):
    model = os.urandom(20000)
    good = write_tar(tmp_path / "good", signed_members(keypair.private, model))
    at = offsets(good)
    data = good.read_bytes()
    for cut in (0, 100, at[MANIFEST] + 10, at[SIGNATURE] + 10, at[MODEL], at[MODEL] + len(model) // 2,
                at[MODEL] + len(model) - 1):
        (tmp_path / "cut").write_bytes(data[:cut])
        refused(tmp_path / "cut", keypair.trusted)


def test_a_model_member_of_another_size_than_the_manifest_says(tmp_path, keypair):
    model = b"GGUF" + bytes(1000)
    manifest = manifest_for(model + b"!", keypair.private)  # signed for one byte more
    path = write_tar(tmp_path / "b", signed_members(keypair.private, model, manifest))
    refused(path, keypair.trusted, "model.gguf is 1004 bytes; the manifest says 1005")


@pytest.mark.parametrize("changes, field", [
    ({"version": 0}, "version"), ({"version": True}, "version"), ({"version": 1.5}, "version"),
    ({"sha256": "z" * 64}, "sha256"), ({"sha256": "AB" * 32}, "sha256"), ({"sha256": "ab"}, "sha256"),
    ({"golden": []}, "golden"), ({"golden": [{"question": "q"}]}, "golden"),
    ({"golden": [{"question": "q", "must_contain": "5"}]}, "golden"),
    ({"size": 0}, "size"), ({"name": ""}, "name"), ({"name": "a\nb"}, "name"),
    ({"expires": 0.0}, "expires"), ({"memory_bytes": -1}, "memory_bytes"),
    ({"tensor_types": {"Q4_1": -1}}, "tensor_types"), ({"rollback": "yes"}, "rollback"),
])
def test_a_validly_signed_manifest_with_bad_fields_is_refused(tmp_path, keypair, changes, field):
    model = b"GGUF" + bytes(1000)
    manifest = manifest_for(model, keypair.private, **changes)
    path = write_tar(tmp_path / "b", signed_members(keypair.private, model, manifest))
    refused(path, keypair.trusted, f"bad {field}")


@pytest.mark.parametrize("data", [b"not json", b"\xff\xfe", b"[1, 2]", b'{"format": 1}', b'{"key_id": 5}'])
def test_a_manifest_naming_no_key_is_refused_before_it_is_read(tmp_path, keypair, data):
    """Nothing but the key id is read from a manifest before its signature checks."""
    refused(write_tar(tmp_path / "b", signed_members(keypair.private, data=data)), keypair.trusted,
            "does not trust")


def test_a_manifest_of_another_format_is_refused_after_its_signature(tmp_path, keypair):
    model = b"GGUF" + bytes(1000)
    obj = json.loads(manifest_for(model, keypair.private).to_bytes())
    data = json.dumps({**obj, "format": 2}).encode()
    refused(write_tar(tmp_path / "b", signed_members(keypair.private, model, data=data)), keypair.trusted,
            "manifest format 2")


# ---- 4. what a board checks before storing a byte ----

def test_an_expired_manifest_is_refused(board, real_bundles):
    _, m = real_bundles[1]
    now = time.time()
    board.check_manifest(m, None)  # the control
    with pytest.raises(BundleError, match="expired on .*sign it again"):
        board.check_manifest(dataclasses.replace(m, created=now - 2 * DAY, expires=now - 1), None)


def test_expiry_is_judged_by_the_newest_time_the_board_trusted(board, real_bundles, tmp_path):
    """A board whose clock is behind still refuses what it has seen expire:
    committing a manifest created in 10 days moves its trusted time there."""
    _, m = real_bundles[1]
    now = time.time()
    later = dataclasses.replace(m, name="other-model", created=now + 10 * DAY, expires=now + 11 * DAY)
    commit_by_hand(board, "a", later, tmp_path)
    assert board.trusted_time() == pytest.approx(now + 10 * DAY, abs=1)  # kept as text: to ~15 digits
    with pytest.raises(BundleError, match="expired"):
        board.check_manifest(dataclasses.replace(m, expires=now + 5 * DAY), None)
    board.check_manifest(dataclasses.replace(m, expires=now + 20 * DAY), None)


def test_a_version_below_the_floor_is_refused_unless_signed_for_rollback(board, real_bundles, tmp_path):
    (_, v1), (_, v2) = real_bundles[1], real_bundles[2]
    board.check_manifest(v1, None)  # nothing installed yet: anything goes
    commit_by_hand(board, "a", v2, tmp_path)
    assert board.floor(NAME) == 2
    with pytest.raises(BundleError, match="v1 is older than v2.*--rollback"):
        board.check_manifest(v1, None)
    board.check_manifest(dataclasses.replace(v1, rollback=True), None)
    board.check_manifest(dataclasses.replace(v2, version=3), None)
    board.check_manifest(dataclasses.replace(v1, name="another-model"), None)  # floors are per name
    with pytest.raises(BundleError, match="v2 is already running"):
        board.check_manifest(v2, None)


def test_a_newer_runtime_is_refused(board, real_bundles):
    _, m = real_bundles[1]
    major, minor, patch = (int(p) for p in edge_slm.__version__.split("."))
    board.check_manifest(dataclasses.replace(m, min_runtime=f"{major}.{minor}.{patch}"), None)
    for newer in (f"{major}.{minor}.{patch + 1}", f"{major}.{minor + 1}.0", f"{major + 1}.0", "99.0.0"):
        with pytest.raises(BundleError, match=f"needs edge-slm {newer}; this is {edge_slm.__version__}"):
            board.check_manifest(dataclasses.replace(m, min_runtime=newer), None)


def test_a_model_over_the_memory_budget_is_refused(board, real_bundles):
    _, m = real_bundles[1]
    board.check_manifest(m, m.memory_bytes)
    with pytest.raises(BundleError, match="the board's budget is"):
        board.check_manifest(m, m.memory_bytes - 1)


def test_a_model_the_disk_cannot_hold_is_refused(board, real_bundles, monkeypatch):
    """The disk is the environment, not the thing under test: it is made small."""
    _, m = real_bundles[1]
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=1 << 30, used=0, free=m.size))
    with pytest.raises(BundleError, match="MiB free"):
        board.check_manifest(m, None)


def test_install_refuses_an_expired_bundle_before_storing_a_byte(board, keypair, tmp_path):
    model = b"GGUF" + bytes(1000)
    now = time.time()
    expired = manifest_for(model, keypair.private, created=now - 2 * DAY, expires=now - DAY)
    path = write_tar(tmp_path / "old.bundle", signed_members(keypair.private, model, expired))
    with pytest.raises(BundleError, match="expired"):
        install(board, path, keypair.trusted, None)
    assert [list(board.slot_dir(s).iterdir()) for s in "ab"] == [[], []]
    assert board.pointer() == Pointer()
    assert board.last_result()[0] == "refused"


# ---- 5. install, trial, commit, roll back ----


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_install_trial_commit_and_rollback_after_failed_starts(board, real_bundles, keypair):
    """v1 installed and committed; v2 installed but never committed: after
    MAX_TRIAL_STARTS starts the board goes back to v1 by itself."""
    (b1, v1), (b2, v2) = real_bundles[1], real_bundles[2]
    assert install(board, b1, keypair.trusted, None) == v1
    p = board.pointer()
    assert (p.active, p.previous, p.trial, p.starts) == ("a", None, True, 0)
    model_a = board.model_path("a")
    assert board.manifest("a") == v1 and sha256_file(model_a) == v1.sha256
    assert board.start() == model_a and board.pointer().starts == 1
    assert board.floor(NAME) == 0  # not before the commit
    board.commit()
    assert board.floor(NAME) == 1
    p = board.pointer()
    assert (p.active, p.trial, p.starts) == ("a", False, 0) and "healthy" in p.reason
    assert board.start() == model_a and board.pointer().starts == 0  # committed: starts are not counted

    assert install(board, b2, keypair.trusted, None) == v2
    p = board.pointer()
    assert (p.active, p.previous, p.trial, p.starts) == ("b", "a", True, 0)
    for n in range(1, MAX_TRIAL_STARTS + 1):
        assert board.start() == board.model_path("b")
        assert board.pointer().starts == n
    assert board.start() == model_a  # the start after the last one allowed
    p = board.pointer()
    assert (p.active, p.previous, p.trial) == ("a", "b", False)
    assert f"slot b did not come back healthy in {MAX_TRIAL_STARTS} starts" in p.reason
    assert board.last_result()[0] == "rolled back"
    assert board.describe()["model"] == {"name": NAME, "version": 1, "sha256": v1.sha256}
    assert board.floor(NAME) == 1  # v2 never earned the floor
    assert board.start() == model_a and not board.pointer().trial


def test_no_install_while_a_slot_is_on_trial_so_its_fallback_stays(board, real_bundles, keypair, tmp_path):
    (_, v1), (b2, v2) = real_bundles[1], real_bundles[2]
    commit_by_hand(board, "a", v1, tmp_path)
    install(board, b2, keypair.trusted, None)  # v2 on trial in b, v1 kept in a
    with pytest.raises(BundleError, match="slot b is on trial"):
        board.check_manifest(replace(v2, version=3, sha256="0" * 64), None)
    assert board.manifest("a") == v1 and board.pointer().previous == "a"


def test_a_bad_model_does_not_cost_the_fallback(board, real_bundles, tiny_bundle, keypair, tmp_path):
    """The whole file is checked before the inactive slot (the fallback) is emptied."""
    (_, v1), (b2, _) = real_bundles[1], real_bundles[2]
    commit_by_hand(board, "a", v1, tmp_path)
    install(board, b2, keypair.trusted, None)
    board.commit()  # v2 active in b, v1 kept in a
    path, _ = tiny_bundle
    tampered = flip_model_byte(path, tmp_path / "tampered")
    with pytest.raises(BundleError, match="does not match"):
        install(board, tampered, keypair.trusted, None)
    assert board.manifest("a") == v1 and board.pointer().previous == "a"


def test_a_first_model_that_never_comes_back_healthy_gives_way_to_the_stock_one(board, real_bundles, tmp_path):
    _, m = real_bundles[1]
    stand_in = tmp_path / "m.gguf"
    stand_in.write_bytes(b"GGUF")
    board.place("a", stand_in, m)
    board.switch("a", "by hand")
    for _ in range(MAX_TRIAL_STARTS):
        assert board.start() == board.model_path("a")
    assert board.start() is None
    p = board.pointer()
    assert (p.active, p.trial) == (None, False) and "did not come back healthy" in p.reason


def test_a_model_that_fails_its_golden_prompts_is_refused(board, real_bundles, tiny_bundle, keypair, tmp_path):
    _, v1 = real_bundles[1]
    commit_by_hand(board, "a", v1, tmp_path)
    before = (board.root / POINTER).read_bytes()
    path, _ = tiny_bundle
    with pytest.raises(BundleError, match=r"pump-assistant v2 refused: \d of 4 golden prompts failed") as e:
        install(board, path, keypair.trusted, None)
    assert "\n" not in str(e.value)
    assert (board.root / POINTER).read_bytes() == before  # the old model keeps answering
    assert list(board.slot_dir("b").iterdir()) == []  # nor is the untrusted model kept
    event, detail = board.last_result()
    assert event == "refused" and "golden prompts failed" in detail
    assert board.floor(NAME) == 1


def test_install_refuses_a_model_that_does_not_match_its_manifest(board, tiny_bundle, keypair, tmp_path):
    path, _ = tiny_bundle
    tampered = flip_model_byte(path, tmp_path / "tampered")
    with pytest.raises(BundleError, match="does not match the manifest's sha256"):
        install(board, tampered, keypair.trusted, None)
    assert [list(board.slot_dir(s).iterdir()) for s in "ab"] == [[], []]  # no .part either
    assert board.pointer() == Pointer()


def test_a_partial_copy_left_by_a_kill_is_not_the_model_and_is_replaced(board, real_bundles, keypair, tmp_path):
    (_, v1), (b2, v2) = real_bundles[1], real_bundles[2]
    commit_by_hand(board, "a", v1, tmp_path)
    part = board.slot_dir("b") / (MODEL + ".part")
    part.write_bytes(b"GGUF" + bytes(4096))  # what `kill -9` in the middle of a receive leaves
    assert board.start() == board.model_path("a")  # the restarted board answers on slot a
    assert board.manifest("b") is None and not board.model_path("b").exists()
    assert board.inactive() == "b"
    assert board.receive(open_bundle(b2, keypair.trusted)) == "b"
    assert not part.exists()
    assert sha256_file(board.model_path("b")) == v2.sha256 and board.manifest("b") == v2
    assert board.pointer().active == "a"  # received, not switched to


# ---- 6. the pointer ----

def test_the_pointer_is_json_after_a_switch_and_nothing_is_left_beside_it(board, real_bundles, tmp_path):
    _, m = real_bundles[1]
    stand_in = tmp_path / "m.gguf"
    stand_in.write_bytes(b"GGUF")
    board.place("a", stand_in, m)
    board.switch("a", "by hand")
    assert json.loads((board.root / POINTER).read_text()) == {
        "active": "a", "previous": None, "trial": True, "starts": 0, "reason": "by hand"}
    assert sorted(p.name for p in board.root.iterdir() if not p.name.startswith("fleet.sqlite3")) == [
        POINTER, "slot-a", "slot-b"]
    assert sorted(p.name for p in board.slot_dir("a").iterdir()) == [MANIFEST, MODEL]


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe\x00", b"[]", b'"a"', b"null", b'{"active": "c"}',
                                     b'{"active": "../../etc"}', b'{"colour": "red"}',
                                     b'{"active": "a", "previous": "x"}', "dir"])
def test_a_corrupt_pointer_falls_back_to_the_stock_model(board, real_bundles, tmp_path, content):
    _, m = real_bundles[1]
    commit_by_hand(board, "a", m, tmp_path)  # a good model is there: only the pointer is lost
    path = board.root / POINTER
    if content == "dir":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(content)
    assert board.pointer() == Pointer()
    assert board.start() is None
    assert board.describe()["slot"] is None
    if content != "dir":
        board.switch("a", "again")  # the next switch writes a good pointer over it
        assert board.pointer().active == "a"


def test_a_pointer_with_wrong_typed_fields_falls_back_to_the_stock_model(board, real_bundles, tmp_path):
    _, m = real_bundles[1]
    commit_by_hand(board, "a", m, tmp_path)
    (board.root / POINTER).write_text(json.dumps(
        {"active": "a", "previous": None, "trial": True, "starts": "x", "reason": ""}))
    assert board.start() is None  # raises TypeError: '>=' between str and int
    assert board.pointer() == Pointer()


# ---- 7. the commands ----

def run(tool: str, *args: object, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "EDGE_SLM_HOME": str(home), "EDGE_SLM_THREADS": "2"})


@pytest.fixture(scope="module")
def cli(real_model, tmp_path_factory) -> SimpleNamespace:
    """A key pair made and the real model packed by `edge-fleet`."""
    home = tmp_path_factory.mktemp("cli-home")
    keygen = run("edge-fleet", "keygen", "--out", home / "keys", home=home)
    assert keygen.returncode == 0, keygen.stderr
    bundle = home / "model.bundle"
    packed = run("edge-fleet", "pack", real_model, "--name", NAME, "--version", 1, "--key",
                 home / "keys" / PRIVATE_FILE, "--out", bundle, home=home)
    assert packed.returncode == 0, packed.stderr
    assert f"{NAME} v1" in packed.stdout and "4 golden prompts" in packed.stdout
    return SimpleNamespace(home=home, keys=home / "keys", public=home / "keys" / PUBLIC_FILE, bundle=bundle,
                           keygen=keygen)


def test_cli_keygen_makes_a_private_key_once(cli):
    assert str(cli.keys / PRIVATE_FILE) in cli.keygen.stdout and str(cli.public) in cli.keygen.stdout
    assert stat.S_IMODE((cli.keys / PRIVATE_FILE).stat().st_mode) == 0o600
    before = (cli.keys / PRIVATE_FILE).read_bytes()
    again = run("edge-fleet", "keygen", "--out", cli.keys, home=cli.home)
    assert_one_line(again, 1, "already exists")
    assert (cli.keys / PRIVATE_FILE).read_bytes() == before


def test_cli_verify_says_good(cli, real_model):
    for key in (cli.public, cli.keys):  # a key file, or a folder of them
        proc = run("edge-fleet", "verify", cli.bundle, "--key", key, home=cli.home)
        assert proc.returncode == 0, proc.stderr
        assert "good" in proc.stdout and f"{NAME} v1" in proc.stdout and "llama" in proc.stdout
    proc = run("edge-fleet", "verify", cli.bundle, "--key", cli.public, "--json", home=cli.home)
    assert json.loads(proc.stdout)["size"] == real_model.stat().st_size


def test_cli_verify_refuses_in_one_line(cli, tmp_path):
    at = offsets(cli.bundle)[MODEL] + 1000
    byte = cli.bundle.read_bytes()[at:at + 1]
    model_changed = edit(cli.bundle, tmp_path / "model-changed", at, byte, bytes([byte[0] ^ 1]))
    proc = run("edge-fleet", "verify", model_changed, "--key", cli.public, home=cli.home)
    assert_one_line(proc, 1, "does not match the manifest's sha256")
    assert "good" not in proc.stdout
    at = cli.bundle.read_bytes().index(b'"version":1')
    manifest_changed = edit(cli.bundle, tmp_path / "manifest-changed", at, b'"version":1', b'"version":7')
    assert_one_line(run("edge-fleet", "verify", manifest_changed, "--key", cli.public, home=cli.home), 1,
                    "signature does not check")
    _, stranger = generate(tmp_path / "stranger")
    assert_one_line(run("edge-fleet", "verify", cli.bundle, "--key", stranger, home=cli.home), 1,
                    "does not trust")


def test_cli_install_puts_the_model_on_trial_once(cli, tmp_path):
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(cli.public, trusted / "operator.pub")
    args = ("install", cli.bundle, "--trusted-keys", trusted, "--fleet-dir", tmp_path / "board")
    proc = run("edge-slm", *args, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{NAME} v1 is in slot a, on trial" in proc.stdout
    assert "no service is running" in proc.stdout
    board = Board(tmp_path / "board")
    try:
        p = board.pointer()
        assert (p.active, p.trial) == ("a", True)
    finally:
        board.close()
    again = run("edge-slm", *args, home=tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.endswith("edge-slm: pump-assistant v1 is already running\n"), again.stderr


def test_cli_install_refuses_in_one_line(cli, tmp_path):
    stranger = tmp_path / "stranger"
    generate(stranger)
    assert_one_line(run("edge-slm", "install", cli.bundle, "--trusted-keys", stranger, "--fleet-dir",
                        tmp_path / "board", home=tmp_path), 1, "does not trust")


def test_the_release_script_parses_and_says_how_to_use_it():
    script = Path(__file__).resolve().parent.parent / "scripts" / "fleet-release"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    usage = subprocess.run([str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    unset = subprocess.run([str(script), "m.gguf", "pump", "1", "hall"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("EDGE_FLEET")})
    assert unset.returncode != 0 and "EDGE_FLEET_KEYS" in unset.stderr


def test_a_release_that_failed_after_its_switch_is_not_taken_again(board, real_bundles, keypair, tmp_path):
    (_, v1), (b2, v2) = real_bundles[1], real_bundles[2]
    commit_by_hand(board, "a", v1, tmp_path)
    install(board, b2, keypair.trusted, None)
    board.give_up("golden prompts failed in service")
    assert board.pointer().active == "a" and board.rolled_back == "golden prompts failed in service"
    with pytest.raises(BundleError, match="failed on this board after its switch"):
        board.check_manifest(v2, None)
    with pytest.raises(BundleError, match="which failed on this board"):  # nor by a rollback command
        board.roll_back("by the operator")
    assert board.pointer().active == "a"


def test_a_gguf_whose_header_lies_about_its_size_is_refused_before_a_byte_is_stored(board, real_model,
                                                                                      keypair, tmp_path):
    model = real_model.read_bytes()[: 20 << 20]  # the header promises ~94 MiB of tensors; 20 are there
    path = write_tar(tmp_path / "lying.bundle", signed_members(keypair.private, model))
    with pytest.raises(BundleError, match="places tensor data past"):
        install(board, path, keypair.trusted, None)
    assert [list(board.slot_dir(s).iterdir()) for s in "ab"] == [[], []]
    assert board.last_result()[0] == "refused"
