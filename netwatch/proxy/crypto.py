"""Encryption at rest for the station queue: AES-256-GCM, one random nonce per field.

Stations send personal data (ID-card applications), so a stolen disk must not yield it.
Each sealed field binds the entry id and the field name as associated data: a field cannot
be swapped into another entry or another column without failing authentication. A wrong key
is caught once, at open, by a key check value stored in the queue's meta table, so a
replayer never sends garbage upstream.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from cryptography.exceptions import InvalidTag

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from netwatch.errors import KeyFileMissingError, QueueKeyError

KEY_SIZE = 32
_NONCE_SIZE = 12
_CHECK_PLAINTEXT = b"netwatch queue key check v1"
_CHECK_AD = b"netwatch:key-check"

log = structlog.get_logger(__name__)


def generate_key_file(path: str | Path) -> Path:
    """Write 32 random bytes to ``path`` with mode 0600; never overwrite an existing key.

    Overwriting would make every entry sealed with the old key unreadable, hence the refusal.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL makes "exists" and "create" one atomic step; 0600 is set at creation, so
        # the key is never readable by others, not even for an instant.
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)  # exact, whatever the umask
    except FileExistsError:
        raise QueueKeyError(f"{p}: key file already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise QueueKeyError(f"{p}: cannot create key file: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(KEY_SIZE))
        f.flush()
        os.fsync(f.fileno())
    return p


def default_key_path(queue_path: str | Path) -> Path:
    """Where the key of a queue without ``key_file`` lives: beside it, ``queue.db`` ->
    ``queue.key`` (created at the queue's first start)."""
    p = Path(queue_path)
    return p.with_name(f"{p.name}.key" if p.suffix == ".key" else f"{p.stem}.key")


def load_key(path: str | Path) -> bytes:
    """Read a raw 32-byte key; every problem is one clear ``QueueKeyError`` line."""
    p = Path(path)
    try:
        data = p.read_bytes()
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise KeyFileMissingError(
            f"{p}: key file not found (create one with `netwatch queue keygen {p}`)"
        ) from None
    except OSError as exc:
        raise QueueKeyError(f"{p}: cannot read key file: {exc.strerror or exc}") from None
    if len(data) != KEY_SIZE:
        raise QueueKeyError(
            f"{p}: a queue key is exactly {KEY_SIZE} raw bytes, this file has {len(data)}"
        )
    if stat.S_IMODE(mode) & 0o077:
        # A warning, not a failure: refusing to start would take the proxy down over a
        # chmod, and the operator sees this line in the daemon's log.
        log.warning("queue key file is readable by group or others", path=str(p), mode=oct(mode))
    return data


class Sealer:
    """Seals and opens queue fields; with no key it passes bytes through unchanged."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) != KEY_SIZE:
            raise QueueKeyError(f"a queue key is exactly {KEY_SIZE} bytes, got {len(key)}")
        self._aead: AESGCM | None = None
        if key is not None:
            # Imported only when a key is configured: the AEAD backend costs about 6 MB of
            # memory that a site without queue encryption need not carry.
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

            self._aead = AESGCM(key)

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def seal(self, entry_id: str, field: str, data: bytes) -> bytes:
        if self._aead is None:
            return data
        nonce = secrets.token_bytes(_NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data, _ad(entry_id, field))

    def open(self, entry_id: str, field: str, blob: bytes) -> bytes:
        if self._aead is None:
            return blob
        try:
            return self._aead.decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], _ad(entry_id, field))
        except (InvalidTag, ValueError):
            raise QueueKeyError(
                f"entry {entry_id}: field {field} fails authentication "
                "(tampered, or sealed with another key)"
            ) from None

    def check_value(self) -> bytes:
        """What the meta table stores at creation to recognise this key later."""
        return self.seal("", "key-check", _CHECK_PLAINTEXT)

    def verify(self, check_value: bytes) -> bool:
        if self._aead is None:
            return False
        try:
            plain = self._aead.decrypt(
                check_value[:_NONCE_SIZE], check_value[_NONCE_SIZE:], _ad("", "key-check")
            )
        except (InvalidTag, ValueError):
            return False
        return plain == _CHECK_PLAINTEXT


def _ad(entry_id: str, field: str) -> bytes:
    return b"%s:%s:%s" % (_CHECK_AD, field.encode(), entry_id.encode())
