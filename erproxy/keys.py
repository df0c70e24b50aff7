"""The API key file: generate, hash, load, reload, revoke.

Only a SHA-256 hash of each key is stored, with a name, a short non-secret prefix for display and
a creation time. The file is written atomically (temp file + fsync + rename, mode 0600) under an
exclusive lock, so concurrent writers never interleave and a crash never leaves half a file.
A file that cannot be parsed is never overwritten: start-up stops with a message instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from .util import exclusive_lock, iso_utc, utc_now

KEY_PREFIX = "er-"
DISPLAY_PREFIX_LEN = 10  # "er-" + 7 characters: enough to tell keys apart, useless to an attacker
log = logging.getLogger("erproxy.keys")

FILE_VERSION = 1
LAST_GOOD_SUFFIX = ".last-good"  # beside the key file: see KeyStore.last_good_path
Stamp = tuple[int, int, int, int]  # what tells a key file changed: mtime, size, inode, ctime (KeyStore)


class KeyFileError(RuntimeError):
    """The key file exists but cannot be used; it is left untouched."""


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]


@dataclass
class KeyRecord:
    name: str
    prefix: str
    hash: str
    created: str
    revoked: bool = False
    rate_limit: str | None = None
    models: list[str] | None = None
    expires: str | None = None  # ISO-8601 UTC, or None for never
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> "KeyRecord":
        if not isinstance(raw, dict):
            raise KeyFileError(f"{where}: each key entry must be an object")
        try:
            known = {k: raw[k] for k in ("name", "prefix", "hash", "created")}
        except KeyError as e:
            raise KeyFileError(f"{where}: key entry is missing {e.args[0]!r}") from None
        if not all(isinstance(v, str) for v in known.values()) or not known["hash"].startswith("sha256:"):
            raise KeyFileError(f"{where}: key entry {raw.get('name')!r} has malformed fields")
        name = known["name"]
        checks = (("revoked", bool, False), ("rate_limit", str, True), ("expires", str, True))
        for key, typ, nullable in checks:
            value = raw.get(key)
            if not (isinstance(value, typ) or (value is None and (nullable or key == "revoked"))):
                raise KeyFileError(f"{where}: key {name!r} has {key}={value!r}, expected {typ.__name__}")
        models = raw.get("models")
        if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
            raise KeyFileError(f"{where}: key {name!r} has models={models!r}, expected a list of names")
        if raw.get("expires"):
            try:
                expires_at(raw["expires"])
            except ValueError:
                raise KeyFileError(f"{where}: key {name!r} has an unreadable expires={raw['expires']!r}") from None
        extra = {k: v for k, v in raw.items()
                 if k not in ("name", "prefix", "hash", "created", "revoked", "rate_limit", "models", "expires")}
        return cls(revoked=bool(raw.get("revoked", False)), rate_limit=raw.get("rate_limit"),
                   models=raw.get("models"), expires=raw.get("expires"), extra=extra, **known)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    def expired(self, now: float | None = None) -> bool:
        if not self.expires:
            return False
        try:
            ts = expires_at(self.expires)
        except ValueError:
            return True  # an unreadable expiry must not grant access forever
        return (time.time() if now is None else now) >= ts


def expires_at(text: str) -> float:
    """An `expires` value as a timestamp. It is UTC: written without a zone (an operator's hand edit,
    2026-12-31T23:59:59) it is read as UTC too, not in the server's local time. ValueError if unreadable."""
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.timestamp()


def parse_key_file(data: bytes, path: Path) -> list[KeyRecord]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise KeyFileError(f"{path} is not valid JSON ({e}); fix or move it away, it will not be overwritten") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeyFileError(f"{path} must be a JSON object with a \"keys\" list; fix or move it away, "
                           "it will not be overwritten")
    records = [KeyRecord.from_json(k, str(path)) for k in doc["keys"]]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise KeyFileError(f"{path}: key names must be unique")
    return records


def _keep_owner(path: Path) -> tuple[int, int] | None:
    """The (uid, gid) a rewrite of `path` must keep, when it is not the writer's own: a `keys` command run as
    root for a gateway running as a service user must leave the file readable to that user, or the gateway
    would go on with its last good keys (a key just revoked among them). Another user but root cannot give
    the file away: refused, saying whom to run as."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    me = os.geteuid()
    if st.st_uid == me:
        return None
    if me == 0:
        return st.st_uid, st.st_gid
    try:
        import pwd

        owner = pwd.getpwuid(st.st_uid).pw_name
    except (ImportError, KeyError):
        owner = f"uid {st.st_uid}"
    raise KeyFileError(f"{path} belongs to {owner}, which the gateway runs as: a rewrite by this user would "
                       f"leave it unreadable to the gateway. Run the command as {owner} (sudo -u {owner} ...) "
                       "or as root")


def write_key_file(path: Path, records: list[KeyRecord]) -> None:
    """Atomically replace `path` with `records` (mode 0600). Call with the lock held."""
    payload = orjson.dumps({"version": FILE_VERSION, "keys": [r.to_json() for r in records]},
                           option=orjson.OPT_INDENT_2) + b"\n"
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    owner = _keep_owner(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock shared by every process that writes the key file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(str(path) + ".lock", 0o600):
        yield


def read_records(path: Path) -> list[KeyRecord]:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise KeyFileError(f"{path} cannot be read (permission denied); run as its owner or fix its mode") from None
    except OSError as e:
        raise KeyFileError(f"{path} cannot be read: {e.strerror}") from None
    return parse_key_file(data, path)


def ensure_key_file(path: Path, name: str = "default") -> str | None:
    """Create the key file with one new key if it does not exist; return that key (else None)."""
    check_name(name)
    with locked(path):
        if path.exists():
            read_records(path)  # validate: a corrupt file stops start-up and stays as it is
            return None
        key = generate_key()
        write_key_file(path, [KeyRecord(name=name, prefix=display_prefix(key), hash=hash_key(key),
                                        created=utc_now())])
        return key


@dataclass(frozen=True)
class Identity:
    """Who is calling: what the rest of the request path may know of a key (never the key)."""

    name: str
    prefix: str
    rate_limit: str | None = None
    models: tuple[str, ...] | None = None
    bucket: str = ""  # rate-limit bucket: from the key's hash, so equal names on other hosts never share one
    token_limit: str | None = None  # prompt tokens per window, e.g. 100000/minute (token_limits.py)


class KeyStore:
    """In-memory view of the key file, refreshed when the file changes.

    While the gateway runs, a key file that disappears or stops parsing changes nothing: the keys
    of the last good load keep working (revoking every key is only ever an explicit `keys revoke`),
    and `error` says what is wrong until a good file is back (/health, a metric and one log line).
    """

    def __init__(self, path: str | Path, access_token: str | None = None,
                 revoked_elsewhere: Callable[[], frozenset[str]] | None = None) -> None:
        self.path = Path(path)
        self._access_token = access_token
        self._revoked_elsewhere = revoked_elsewhere or frozenset
        self._by_hash: dict[str, KeyRecord] = {}
        self._identities: dict[str, Identity] = {}
        self._retired: dict[str, KeyRecord] = {}  # hashes of secrets replaced by keys rotate
        self._stamp: Stamp | None = None
        self._saved_stamp: Stamp | None = None  # the stamp last copied to last_good_path
        self.error: str | None = None  # what is wrong with the file now; None when the last read was good
        self.last_good_load: float | None = None  # time.time() of the last good read
        self._warned_names: set[str] = set()

    def _file_stamp(self) -> Stamp | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        # ctime too: a chown or chmod that makes an unreadable file readable again changes only that
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)

    @property
    def size(self) -> int:
        """Keys known (the last good load's)."""
        return len(self._by_hash)

    @property
    def last_good_load_iso(self) -> str | None:
        return iso_utc(self.last_good_load) if self.last_good_load is not None else None

    def status(self) -> dict[str, Any]:
        """What /health shows of the key file."""
        return {"file": str(self.path), "last_good_load": self.last_good_load_iso, "error": self.error}

    def _use(self, records: list[KeyRecord], stamp: Stamp | None) -> None:
        self._by_hash = {r.hash: r for r in records}
        self._retired = {h: r for r in records for h in (r.extra.get("retired_hashes") or ()) if isinstance(h, str)}
        self._identities = {
            r.hash: Identity(r.name, r.prefix, r.rate_limit, tuple(r.models) if r.models else None, r.hash[7:39],
                              _text(r.extra.get("token_limit")))
            for r in records
        }
        self._stamp = stamp
        self.error = None
        self.last_good_load = time.time()

    def _missing(self) -> str:
        return f"{self.path} is missing (deleted or moved away?); restore it from a backup"

    @property
    def last_good_path(self) -> Path:
        """A copy of the last key file read good (hashes, never keys): what a worker started while the file
        is missing or corrupt serves, as the workers already running do from memory."""
        return self.path.with_name(self.path.name + LAST_GOOD_SUFFIX)

    def load(self) -> None:
        """(Re)read the file. Missing or corrupt: the last good copy's keys (and `error`); without one, a
        missing file gives no keys (and `error`) and a corrupt one raises KeyFileError."""
        stamp = self._file_stamp()
        try:
            if stamp is None:
                raise KeyFileError(self._missing())
            records = read_records(self.path)
        except KeyFileError as e:
            kept = self._read_last_good()
            if kept is not None:
                self._use(kept, stamp)
                self.error = f"{e}; serving the last good keys ({self.last_good_path.name})"
                self.last_good_load = kept_at = os.stat(self.last_good_path).st_mtime
                log.error("key file: %s (last read good at %s)", self.error, iso_utc(kept_at))
                return
            if stamp is not None:
                raise
            self._by_hash, self._identities, self._retired, self._stamp = {}, {}, {}, None
            self.error = str(e)
            return
        self._use(records, stamp)
        self._save_last_good(records)
        self._warn_about_names(records)

    def _warn_about_names(self, records: list[KeyRecord]) -> None:
        """Names written by hand or by older versions that `keys create` now refuses: served as they are,
        said once per name (a reserved one mixes its usage rows or metrics with another's)."""
        for r in records:
            if r.name in self._warned_names:
                continue
            try:
                check_name(r.name)
            except ValueError as e:
                self._warned_names.add(r.name)
                log.warning("key file: key %r is served, but its name should change (%s): create a key under a "
                            "valid name and revoke this one", r.name, e)

    def _read_last_good(self) -> list[KeyRecord] | None:
        try:
            return read_records(self.last_good_path) if self.last_good_path.exists() else None
        except KeyFileError:
            return None

    def _save_last_good(self, records: list[KeyRecord]) -> None:
        if self._stamp == self._saved_stamp:
            return
        try:
            write_key_file(self.last_good_path, records)
            self._saved_stamp = self._stamp
        except (OSError, KeyFileError) as e:  # a convenience: never a reason to refuse good keys
            log.warning("could not keep a copy of the good key file in %s: %s", self.last_good_path, e)

    def reload_if_changed(self) -> bool:
        """Pick up edits made by `keys` commands or other instances. A missing or bad file keeps the
        last good keys and sets `error` (returns False); True when new keys were loaded."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a bad file is read once per change, not on every check
        if stamp is None:
            self.error = self._missing()
            return False
        try:
            records = read_records(self.path)
        except KeyFileError as e:
            self.error = str(e)
            return False
        self._use(records, stamp)
        self._save_last_good(records)
        return True

    def authenticate(self, key: str) -> Identity | str:
        """Return the caller's Identity, or a reason string for a 401."""
        if self._access_token and hmac.compare_digest(key.encode(), self._access_token.encode()):
            return Identity("access_token", "token", bucket="token:" + hash_key(self._access_token)[7:39])
        h = hash_key(key)
        record = self._by_hash.get(h)
        if record is None:
            if h in self._retired:  # "has been revoked": a 401 that is not counted as a guess (auth_throttle)
                return ("This API key has been revoked: it was replaced by a new one (keys rotate). Ask the "
                        "operator for the new key.")
            return "Invalid API key. Check the key you pass as 'Authorization: Bearer <key>' or '?api_key='."
        if record.revoked or h in self._revoked_elsewhere():
            return f"API key {record.prefix}… has been revoked. Ask the operator for a new key."
        if record.expired():
            return f"API key {record.prefix}… expired at {record.expires}. Ask the operator for a new key."
        return self._identities[h]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# ---- key management (the `keys` command) -------------------------------------------------------
def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '3600s' or a bare number of seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise ValueError(f"cannot read duration {text!r}; use e.g. 30d, 12h, 90m") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"duration must be a positive number, got {text!r}")
    if value > MAX_DURATION_S:
        raise ValueError(f"duration {text!r} is more than 100 years; leave --expires-in out for a key that never expires")
    return value


MAX_DURATION_S = 100 * 365.25 * 86400
RETIRED_KEPT = 5  # hashes of a key's replaced secrets remembered (keys rotate)
# A name shows in logs, metrics and usage rows; `keys` would be the Redis usage index of a day
# (erproxy:usage:DAY:keys) and `access_token` is ACCESS_TOKEN's own name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
RESERVED_NAMES = frozenset({"keys", "access_token"})


def check_name(name: str) -> str:
    """A key name fit for logs, metric labels and usage rows; ValueError saying what is allowed otherwise."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"a key name is 1-64 letters, digits and . _ @ + - (starting with a letter or digit), "
                         f"got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved; choose another name")
    return name


def _find(records: list[KeyRecord], ref: str) -> KeyRecord:
    matches = [r for r in records if r.name == ref] or [r for r in records if r.prefix.startswith(ref) and len(ref) >= 6]
    if not matches:
        raise KeyError(f"no key named or prefixed {ref!r}")
    if len(matches) > 1:
        raise KeyError(f"{ref!r} matches several keys; use the name")
    return matches[0]


def create_key(path: Path, name: str, *, rate_limit: str | None = None, models: list[str] | None = None,
               expires_in: float | None = None, token_limit: str | None = None) -> tuple[str, KeyRecord]:
    """Add a key under the file lock; returns (plaintext key, record). The plaintext is never stored."""
    check_name(name)
    with locked(path):
        records = read_records(path) if path.exists() else []
        if any(r.name == name for r in records):
            raise KeyError(f"a key named {name!r} already exists; choose another name or rotate it")
        key = generate_key()
        expires = iso_utc(time.time() + expires_in) if expires_in is not None else None
        record = KeyRecord(name=name, prefix=display_prefix(key), hash=hash_key(key), created=utc_now(),
                           rate_limit=rate_limit, models=models, expires=expires,
                           extra={"token_limit": token_limit} if token_limit else {})
        write_key_file(path, records + [record])
        return key, record


def revoke_key(path: Path, ref: str) -> KeyRecord:
    with locked(path):
        records = read_records(path)
        record = _find(records, ref)
        record.revoked = True
        record.extra["revoked_at"] = utc_now()
        write_key_file(path, records)
        return record


def rotate_key(path: Path, name: str) -> tuple[str, KeyRecord, str]:
    """Replace a key's secret, keeping its name, limits and models; the old secret stops working.

    Returns (new plaintext key, record, hash of the old secret).
    """
    with locked(path):
        records = read_records(path)
        record = _find(records, name)
        if record.revoked:  # revoked for a reason (a leak): only a new key brings the name back
            raise KeyError(f"{record.name!r} is revoked; rotating would make it valid again. Create a new key "
                           "instead (keys create --name NEW)")
        old_hash = record.hash
        key = generate_key()
        # the old secret's hash is kept (a few): a client still sending it is told it was replaced, and is
        # not counted as guessing keys, which would lock out every client at its address
        retired = record.extra.get("retired_hashes")
        record.extra["retired_hashes"] = [old_hash, *(retired if isinstance(retired, list) else [])][:RETIRED_KEPT]
        record.hash, record.prefix, record.revoked = hash_key(key), display_prefix(key), False
        record.extra["rotated_at"] = utc_now()
        write_key_file(path, records)
        return key, record, old_hash
