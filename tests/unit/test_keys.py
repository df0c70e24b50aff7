import json
import os
import stat

import pytest

from erproxy import keys as keymod
from erproxy.keys import KeyFileError, KeyStore, ensure_key_file, hash_key, read_records


def test_first_start_creates_one_hashed_key_with_mode_0600(tmp_path):
    path = tmp_path / "er_api_keys.json"
    key = ensure_key_file(path)
    assert key and key.startswith("er-") and len(key) >= 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = path.read_text()
    assert key not in raw and key[10:] not in raw  # only hash and short display prefix stored
    doc = json.loads(raw)
    (entry,) = doc["keys"]
    assert entry["hash"] == hash_key(key)
    assert entry["prefix"] == key[:10]
    assert entry["name"] == "default" and entry["created"].endswith("Z")
    assert ensure_key_file(path) is None  # second start: no new key
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_key_file_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "k.json"
    ensure_key_file(path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(keymod.os, "replace", crash)
    with pytest.raises(OSError):
        keymod.write_key_file(path, [])
    assert path.read_bytes() == before
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"keys": [{"name": "x"}]}', b""])
def test_corrupt_key_file_is_refused_and_left_untouched(tmp_path, content):
    path = tmp_path / "k.json"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as e:
        ensure_key_file(path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == content


def test_unreadable_key_file_is_refused(tmp_path):
    path = tmp_path / "k.json"
    ensure_key_file(path)
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads anything; simulate with a directory instead
        os.chmod(path, 0o600)
        path.unlink()
        path.mkdir()
    with pytest.raises(KeyFileError):
        read_records(path)


def test_store_authenticates_by_hash_and_refuses_revoked_and_expired(tmp_path):
    path = tmp_path / "k.json"
    key = ensure_key_file(path)
    store = KeyStore(path, access_token="static-token")
    store.load()
    who = store.authenticate(key)
    assert not isinstance(who, str) and who.name == "default"
    assert isinstance(store.authenticate(key + "x"), str)
    assert store.authenticate("static-token").name == "access_token"

    records = read_records(path)
    records[0].revoked = True
    keymod.write_key_file(path, records)
    assert store.reload_if_changed()
    assert "revoked" in store.authenticate(key)

    records[0].revoked = False
    records[0].expires = "2001-01-01T00:00:00Z"
    keymod.write_key_file(path, records)
    store.reload_if_changed()
    assert "expired" in store.authenticate(key)


def test_bad_edit_keeps_previous_keys_in_a_running_store(tmp_path):
    path = tmp_path / "k.json"
    key = ensure_key_file(path)
    store = KeyStore(path)
    store.load()
    path.write_text("{broken")
    assert store.reload_if_changed() is False
    assert store.authenticate(key).name == "default"


@pytest.mark.parametrize("field,value", [
    ("expires", 12345), ("expires", "next tuesday"), ("rate_limit", ["100/minute"]), ("models", "minilm"),
    ("revoked", "no"),
])
def test_wrongly_typed_key_fields_are_refused_at_load(tmp_path, field, value):
    path = tmp_path / "k.json"
    ensure_key_file(path)
    doc = json.loads(path.read_text())
    doc["keys"][0][field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match=field):
        read_records(path)


def test_rate_limit_buckets_come_from_the_key_not_its_name(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    ka, kb = ensure_key_file(a), ensure_key_file(b)  # two hosts, each with a key named "default"
    sa, sb = KeyStore(a), KeyStore(b)
    sa.load()
    sb.load()
    ia, ib = sa.authenticate(ka), sb.authenticate(kb)
    assert ia.name == ib.name == "default" and ia.bucket != ib.bucket and ia.bucket


def test_a_rewrite_by_root_keeps_the_key_files_owner(tmp_path, monkeypatch):
    """`sudo … keys revoke` for a gateway running as a service user: the file must stay that user's, or the
    gateway could no longer read it and would go on accepting the revoked key."""
    path = tmp_path / "k.json"
    ensure_key_file(path)
    root = os.geteuid() == 0
    if root:
        os.chown(path, 65534, 65534)  # the service user's
        owner = (65534, 65534)
    else:  # not root here: the file is ours, and root's rewrite is played with geteuid and fchown
        st = os.stat(path)
        owner = (st.st_uid, st.st_gid)
        given: list[tuple[int, int]] = []
        monkeypatch.setattr(keymod.os, "geteuid", lambda: 0)
        monkeypatch.setattr(keymod.os, "fchown", lambda fd, uid, gid: given.append((uid, gid)))
    keymod.write_key_file(path, read_records(path))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert ((st.st_uid, st.st_gid) if root else given[0]) == owner


def test_a_rewrite_by_another_user_than_the_owner_is_refused_naming_whom_to_run_as(tmp_path, monkeypatch):
    path = tmp_path / "k.json"
    ensure_key_file(path)
    before = path.read_bytes()
    monkeypatch.setattr(keymod.os, "geteuid", lambda: os.stat(path).st_uid + 1000)  # not the owner, not root
    with pytest.raises(KeyFileError, match="Run the command as"):
        keymod.write_key_file(path, [])
    assert path.read_bytes() == before


def test_a_chmod_or_chown_alone_is_noticed_by_the_reload(tmp_path):
    """Making an unreadable key file readable again changes only its ctime: the reload must look again."""
    path = tmp_path / "k.json"
    ensure_key_file(path)
    store = KeyStore(path)
    store.load()
    before = store._file_stamp()
    os.chmod(path, 0o640)
    assert store._file_stamp() != before


def test_a_worker_started_while_the_key_file_is_missing_or_corrupt_serves_the_last_good_keys(tmp_path):
    path = tmp_path / "k.json"
    key = ensure_key_file(path)
    running = KeyStore(path)
    running.load()  # a good read leaves a copy beside the file
    assert running.last_good_path.exists() and stat.S_IMODE(os.stat(running.last_good_path).st_mode) == 0o600
    for damage in ("corrupt", "missing"):
        if damage == "corrupt":
            path.write_text("{ half")
        else:
            path.unlink()
        restarted = KeyStore(path)  # a worker replaced after a crash
        restarted.load()
        assert restarted.size == 1 and restarted.authenticate(key).name == "default"
        assert restarted.error and "last good keys" in restarted.error


def test_a_corrupt_key_file_with_no_good_copy_still_stops_the_start(tmp_path):
    path = tmp_path / "k.json"
    path.write_text("{ half")
    with pytest.raises(KeyFileError):
        KeyStore(path).load()


def test_an_expiry_written_without_a_zone_is_utc_whatever_the_servers_zone(tmp_path, monkeypatch):
    import time
    from datetime import datetime, timedelta, timezone

    hour_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).replace(tzinfo=None).isoformat(timespec="seconds")
    record = keymod.KeyRecord(name="n", prefix="er-x", hash="sha256:" + "0" * 64, created="2026-01-01T00:00:00Z",
                              expires=hour_ago)  # a hand edit: no Z
    for zone in ("America/New_York", "Asia/Tokyo", "UTC"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        assert record.expired(), zone
    monkeypatch.delenv("TZ")
    time.tzset()


@pytest.mark.parametrize("name, why", [
    ("keys", "reserved"), ("access_token", "reserved"), ("", "1-64 letters"), ("team a", "1-64 letters"),
    ("evil\nkey=admin", "1-64 letters"), ("-dash", "1-64 letters"), ("x" * 65, "1-64 letters"),
])
def test_key_names_that_would_break_logs_metrics_or_usage_are_refused(tmp_path, name, why):
    path = tmp_path / "keys.json"
    with pytest.raises(ValueError, match=why):
        keymod.create_key(path, name)
    assert not path.exists()  # nothing written
    keymod.create_key(path, "team-a.prod@eu+1")
    assert [r.name for r in read_records(path)] == ["team-a.prod@eu+1"]


def test_rotating_a_revoked_key_is_refused_so_a_leaked_key_stays_dead(tmp_path):
    path = tmp_path / "keys.json"
    keymod.create_key(path, "leaked")
    keymod.revoke_key(path, "leaked")
    with pytest.raises(KeyError, match="is revoked"):
        keymod.rotate_key(path, "leaked")
    [record] = read_records(path)
    assert record.revoked is True


@pytest.mark.parametrize("text", ["inf", "nan", "1e20d", "-1d", "0", "soon"])
def test_expiry_durations_that_are_not_a_sane_number_are_refused_with_a_message(text):
    with pytest.raises(ValueError, match="duration"):
        keymod.parse_duration(text)


def test_keys_init_checks_the_name_and_a_bad_name_already_in_a_file_is_served_with_a_warning(tmp_path, caplog):
    with pytest.raises(ValueError, match="reserved"):
        ensure_key_file(tmp_path / "a.json", "keys")
    assert not (tmp_path / "a.json").exists()
    path = tmp_path / "b.json"
    keymod.create_key(path, "fine")
    doc = json.loads(path.read_text())
    doc["keys"][0]["name"] = "keys"  # written by an older version, or by hand
    path.write_text(json.dumps(doc))
    store = KeyStore(path)
    store.load()
    store.load()
    warnings = [r for r in caplog.records if "should change" in r.getMessage()]
    assert len(warnings) == 1 and "'keys'" in warnings[0].getMessage()
    assert store.size == 1  # still served


def test_lock_and_audit_files_a_root_run_command_creates_belong_to_their_folders_owner(tmp_path, monkeypatch):
    """A `keys` command run as root in a service user's folders must not leave a root-owned lock file or
    audit log behind: the gateway (and that user's next `keys` command) could no longer open them."""
    from erproxy import util
    from erproxy.audit import audit
    from erproxy.settings import Settings

    keys_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    keys_dir.mkdir()
    log_dir.mkdir()
    if os.geteuid() == 0:  # a real service user's folders
        for d in (keys_dir, log_dir):
            os.chown(d, 65534, 65534)
        owner = (65534, 65534)
    else:  # play root: the folders are this user's
        owner = (os.getuid(), os.getgid())
    given: dict[str, tuple[int, int]] = {}

    def recording_fchown(fd, uid, gid):
        given[os.readlink(f"/proc/self/fd/{fd}")] = (uid, gid)

    monkeypatch.setattr(util.os, "geteuid", lambda: 0)
    monkeypatch.setattr(util.os, "fchown", recording_fchown)
    keymod.create_key(keys_dir / "er_api_keys.json", "team-a")
    audit(Settings.from_env({"LOG_DIR": str(log_dir), "API_KEYS_FILE": str(keys_dir / "er_api_keys.json")},
                            env_file=""), "create", "team-a")
    assert given[str(keys_dir / "er_api_keys.json.lock")] == owner
    assert given[str(log_dir / "key_audit.log")] == owner
    given.clear()
    keymod.create_key(keys_dir / "er_api_keys.json", "team-b")  # the lock exists now: left as it is
    assert str(keys_dir / "er_api_keys.json.lock") not in given
