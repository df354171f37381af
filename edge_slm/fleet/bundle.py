"""Bundles: one file an operator signs and a board trusts, holding a GGUF
model and its manifest.

A bundle is an uncompressed tar (`tar tf` lists it) of exactly three
regular files, in this order:

    manifest.json   what the model is and what a board must check (FORMAT 1), <= MAX_MANIFEST
    manifest.sig    the Ed25519 signature of manifest.json's bytes (64 bytes)
    model.gguf      the model; its size and sha256 are in the manifest

A bundle is untrusted input until its signature checks: anything else in
it (a link, a directory, a name with a path, a member twice, a compressed
stream, a size that disagrees with the manifest) refuses it before a byte
of it is written anywhere. Nothing is compressed, so nothing can expand."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from .. import __version__
from ..errors import EdgeSlmError, is_whole
from .keys import key_id, raw_public

FORMAT = 1
MANIFEST, SIGNATURE, MODEL = "manifest.json", "manifest.sig", "model.gguf"
MEMBERS = (MANIFEST, SIGNATURE, MODEL)
MAX_MANIFEST = 64 * 1024
MAX_GOLDEN = 32                   # golden prompts in a manifest
MAX_NAME = 64
DEFAULT_EXPIRES_DAYS = 365
# What a board asks of a model before it trusts it, unless the operator gives
# its own: plain facts any instruction-tuned model states (the reference
# model does, greedy); a random-weight file of the same shape does not.
DEFAULT_GOLDEN = (
    {"question": "What is 2 + 3?", "must_contain": ["5", "five"]},
    {"question": "Name the planet we live on.", "must_contain": ["Earth"]},
    {"question": "How many days are in a week?", "must_contain": ["7", "seven"]},
    {"question": "What color is the sky on a clear day?", "must_contain": ["blue"]},
)
CHUNK = 1 << 20  # bytes read at a time while hashing and copying


class BundleError(EdgeSlmError):
    """A bundle that is malformed, unsigned, tampered with or not for this board."""


@dataclass(frozen=True)
class Manifest:
    name: str                       # the model's name in the fleet: "pump-assistant"
    version: int                    # monotonic per name: a board refuses a lower one
    sha256: str                     # of model.gguf
    size: int                       # bytes of model.gguf
    architecture: str               # general.architecture
    tensor_types: dict[str, int]    # tensor type -> count
    min_runtime: str                # the oldest edge-slm that runs it
    memory_bytes: int               # the memory plan's total at the default context, one slot
    created: float                  # seconds since the epoch, when packed
    expires: float                  # after this, boards refuse to install it
    key_id: str                     # which key signed it
    golden: list[dict] = field(default_factory=lambda: [dict(g) for g in DEFAULT_GOLDEN])
    rollback: bool = False          # signed permission to go below the board's version floor
    format: int = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BundleError("manifest.json is not JSON") from None
        if not isinstance(obj, dict):
            raise BundleError("manifest.json is not a JSON object")
        if type(obj.get("format")) is not int or obj["format"] != FORMAT:
            raise BundleError(f"manifest format {obj.get('format')!r}; this edge-slm reads {FORMAT}")
        names = {f for f in cls.__dataclass_fields__}
        missing = names - set(obj) - {"rollback", "golden"}
        if missing:
            raise BundleError(f"manifest.json lacks {', '.join(sorted(missing))}")
        m = cls(**{k: v for k, v in obj.items() if k in names})
        m.check()
        return m

    def check(self) -> None:
        """Types and ranges, so nothing later trips over a hostile value."""
        text = lambda v, n=MAX_NAME: isinstance(v, str) and 0 < len(v) <= n  # noqa: E731
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # noqa: E731
        problems = [
            (text(self.name) and self.name.isprintable(), "name"),
            (is_whole(self.version, 1) and self.version < 2**53, "version"),
            (isinstance(self.sha256, str) and len(self.sha256) == 64
             and all(c in "0123456789abcdef" for c in self.sha256), "sha256"),
            (is_whole(self.size, 1) and self.size < 1 << 40, "size"),
            (text(self.architecture), "architecture"),
            (isinstance(self.tensor_types, dict) and all(text(k) and is_whole(v, 0)
                                                          for k, v in self.tensor_types.items()),
             "tensor_types"),
            (text(self.min_runtime, 32), "min_runtime"),
            (is_whole(self.memory_bytes, 1), "memory_bytes"),
            (number(self.created) and number(self.expires) and self.expires > self.created, "expires"),
            (text(self.key_id, 64), "key_id"),
            (isinstance(self.rollback, bool), "rollback"),
            (isinstance(self.golden, list) and 0 < len(self.golden) <= MAX_GOLDEN
             and all(_golden_ok(g) for g in self.golden), "golden"),
        ]
        bad = [name for ok, name in problems if not ok]
        if bad:
            raise BundleError(f"manifest.json: bad {', '.join(bad)}")


def _golden_ok(g: object) -> bool:
    return (isinstance(g, dict) and isinstance(g.get("question"), str) and 0 < len(g["question"]) <= 1000
            and isinstance(g.get("must_contain"), list) and 0 < len(g["must_contain"]) <= 16
            and all(isinstance(s, str) and 0 < len(s) <= 200 for s in g["must_contain"]))


def load_golden(path: Path) -> list[dict]:
    """The operator's golden prompts: a JSON list of {"question", "must_contain": [...]}."""
    try:
        golden = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: not a JSON file of golden prompts ({e})") from None
    if not (isinstance(golden, list) and 0 < len(golden) <= MAX_GOLDEN and all(_golden_ok(g) for g in golden)):
        raise BundleError(f"{path}: expected a list of 1 to {MAX_GOLDEN} "
                          '{"question": "...", "must_contain": ["...", ...]}')
    return golden


def runtime_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def sha256_of(f: BinaryIO, size: int, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    left = size
    while left:
        block = f.read(min(CHUNK, left))
        if not block:
            raise BundleError("the bundle ends early: model.gguf is cut short")
        h.update(block)
        left -= len(block)
        if progress:
            progress(len(block))
    return h.hexdigest()


def pack(model: Path, out: Path, *, name: str, version: int, private_key, golden: list[dict] | None = None,
         expires_days: float = DEFAULT_EXPIRES_DAYS, rollback: bool = False,
         progress: Callable[[int], None] | None = None) -> Manifest:
    """Sign `model` into the bundle `out`. The model is loaded first (a file
    edge-slm cannot run is refused here, not on a board) and its memory
    planned at the default context with one slot."""
    from ..engine import EngineConfig, load_and_plan
    from ..paths import output_file

    cfg = EngineConfig(model=model, slots=1, grounding=False)
    loaded, _, plan = load_and_plan(cfg)
    size = model.stat().st_size
    with open(model, "rb") as f:
        digest = sha256_of(f, size, progress)
    now = time.time()
    public = raw_public(private_key.public_key())
    manifest = Manifest(
        name=name, version=version, sha256=digest, size=size,
        architecture=str(loaded.file.get("general.architecture", "?")),
        tensor_types=dict(Counter(t.type.name for t in loaded.tensors.values())),
        min_runtime=__version__, memory_bytes=plan.total, created=now,
        expires=now + expires_days * 86400, key_id=key_id(public),
        golden=[dict(g) for g in (golden or DEFAULT_GOLDEN)], rollback=rollback)
    manifest.check()
    data = manifest.to_bytes()
    signature = private_key.sign(data)
    with output_file(out) as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in ((MANIFEST, data), (SIGNATURE, signature)):
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(payload), int(now), 0o644
            tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo(MODEL)
        info.size, info.mtime, info.mode = size, int(now), 0o644
        with open(model, "rb") as m:
            tar.addfile(info, m)
    return manifest


@dataclass
class Opened:
    """A bundle whose structure and signature checked: its manifest, and where
    in the file the model's bytes are (the model itself is not yet checked)."""

    path: Path
    manifest: Manifest
    model_offset: int
    model_size: int


@dataclass
class Raw:
    """A bundle whose structure checked, its signature not yet."""

    path: Path
    manifest: bytes
    signature: bytes
    model_offset: int
    model_size: int


def read_bundle(path: Path) -> Raw:
    """Check a bundle's structure and read its manifest and signature (the
    headers and the manifest only); raises BundleError naming what is wrong."""
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file")
    try:
        tar = tarfile.open(path, mode="r:")  # "r:": an uncompressed tar only
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{path}: not a bundle (an uncompressed tar): {e}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError) as e:
            raise BundleError(f"{path}: damaged ({e})") from None
        names = [m.name for m in members]
        if names != list(MEMBERS):
            raise BundleError(f"{path}: holds {names[:5]}; a bundle holds exactly {', '.join(MEMBERS)}")
        if not all(m.isreg() for m in members):
            raise BundleError(f"{path}: a member is a link, a directory or a device, not a file")
        by_name = {m.name: m for m in members}
        if by_name[MANIFEST].size > MAX_MANIFEST:
            raise BundleError(f"{path}: manifest.json is {by_name[MANIFEST].size} bytes, more than {MAX_MANIFEST}")
        if by_name[SIGNATURE].size != 64:
            raise BundleError(f"{path}: manifest.sig is not an Ed25519 signature (64 bytes)")
        data = tar.extractfile(by_name[MANIFEST]).read()
        signature = tar.extractfile(by_name[SIGNATURE]).read()
        model = by_name[MODEL]
    if path.stat().st_size < model.offset_data + model.size:
        raise BundleError(f"{path}: the bundle is cut short")
    return Raw(path, data, signature, model.offset_data, model.size)


def verify_manifest(data: bytes, signature: bytes, trusted: dict[str, object]) -> Manifest:
    """The manifest, if `signature` is a trusted key's over exactly `data`."""
    from cryptography.exceptions import InvalidSignature

    try:
        claimed = json.loads(data.decode("utf-8")).get("key_id")
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        claimed = None
    key = trusted.get(claimed) if isinstance(claimed, str) else None
    if key is None:
        raise BundleError(f"signed by a key this board does not trust ({str(claimed)[:16]})")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise BundleError("the manifest's signature does not check: tampered with, or "
                          "signed by another key") from None
    return Manifest.from_bytes(data)


def bundle_id(manifest: bytes) -> str:
    """A bundle's name on the wire: the hash of its signed manifest."""
    return hashlib.sha256(manifest).hexdigest()[:32]


def open_bundle(path: Path, trusted: dict[str, object]) -> Opened:
    """Check a bundle's structure and its manifest's signature against the
    `trusted` keys (key id -> public key); the model's bytes are not read."""
    raw = read_bundle(path)
    try:
        manifest = verify_manifest(raw.manifest, raw.signature, trusted)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None
    if raw.model_size != manifest.size:
        raise BundleError(f"{path}: model.gguf is {raw.model_size} bytes; the manifest says {manifest.size}")
    return Opened(path, manifest, raw.model_offset, raw.model_size)


def verify_model(opened: Opened, progress: Callable[[int], None] | None = None) -> None:
    """The model's bytes in the bundle against the manifest's sha256."""
    with open(opened.path, "rb") as f:
        f.seek(opened.model_offset)
        digest = sha256_of(f, opened.model_size, progress)
    if digest != opened.manifest.sha256:
        raise BundleError(f"{opened.path}: model.gguf does not match the manifest's sha256: tampered "
                          "with or damaged")
