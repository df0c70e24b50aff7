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
