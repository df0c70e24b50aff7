import re
from pathlib import Path

import pytest

from erproxy.settings import SPECS, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_documented_product():
    s = Settings.from_env({}, env_file="")
    assert (s.host, s.port, s.workers, s.timeout) == ("0.0.0.0", 2048, 1, 600.0)
    assert s.embedding_upstreams == ("http://127.0.0.1:8000",)
    assert s.reranker_upstreams == ("http://127.0.0.1:8001",)
    assert s.api_keys_file == "er_api_keys.json"
    assert s.rate_limit == "100/minute"
    assert s.max_concurrent_requests == 500
    assert s.redis_url is None


def test_upstream_lists_are_comma_separated_and_trimmed():
    s = Settings.from_env({"EMBEDDING_UPSTREAMS": " http://a:1/ , http://b:2 "}, env_file="")
    assert s.embedding_upstreams == ("http://a:1", "http://b:2")


@pytest.mark.parametrize("name,value", [
    ("PORT", "abc"), ("PORT", "70000"), ("WORKERS", "0"), ("TIMEOUT", "-1"), ("RATE_LIMIT", "lots"),
    ("MAX_CONCURRENT_REQUESTS", "0"), ("MAX_BODY_BYTES", "huge"), ("EMBEDDING_UPSTREAMS", "not a url"),
    ("LOG_LEVEL", "chatty"), ("RERANKER_UPSTREAMS", ","),
])
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value}, env_file="")


def test_several_workers_need_redis():
    with pytest.raises(SettingsError, match="REDIS_URL"):
        Settings.from_env({"WORKERS": "4"}, env_file="")
    assert Settings.from_env({"WORKERS": "4", "REDIS_URL": "redis://127.0.0.1:6379/0"}, env_file="").workers == 4


def test_dotenv_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=3000\nRATE_LIMIT=5/second\n")
    s = Settings.from_env({"PORT": "4000"}, env_file=env_file)
    assert s.port == 4000 and s.rate_limit == "5/second"


def test_sizes_accept_units():
    assert Settings.from_env({"MAX_BODY_BYTES": "2MiB"}, env_file="").max_body_bytes == 2 * 1024 * 1024


def test_env_example_lists_every_variable_with_its_default():
    text = (ROOT / ".env.example").read_text()
    for spec in SPECS:
        m = re.search(rf"^#?\s*{spec.env}=(.*)$", text, re.M)
        assert m, f"{spec.env} missing from .env.example"
        assert m.group(1).strip().strip('"') == spec.default, spec.env


def test_readme_configuration_table_lists_every_variable():
    readme = (ROOT / "README.md").read_text()
    for spec in SPECS:
        assert f"`{spec.env}`" in readme, spec.env


@pytest.mark.parametrize("name,value", [
    ("TIMEOUT", "inf"), ("KEEP_ALIVE", "nan"), ("SHUTDOWN_GRACE", "1e400"), ("REDIS_URL", "localhost:6379"),
    ("EMBEDDING_UPSTREAMS", "http://h:99999"), ("EMBEDDING_UPSTREAMS", "http://user:pw@h:8000"),
    ("LOG_FORMAT", "%(nosuchfield)s"), ("RATE_LIMIT", "0/minute"), ("RATE_LIMIT", "1/second;100/minute"),
])
def test_values_that_would_break_at_run_time_are_refused_at_start(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value}, env_file="")
