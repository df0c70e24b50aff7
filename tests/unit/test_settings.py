import logging
import os
import re
from pathlib import Path

import pytest

from erproxy.settings import SPECS, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]



def start_up_messages(settings, *args, **kwargs) -> list[str]:
    """What `cli.log_start` logs on the "erproxy" logger, whatever logging set-up ran before."""
    from erproxy import cli

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("erproxy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        cli.log_start(settings, *args, **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return [r.getMessage() for r in records]

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


def test_several_workers_without_redis_url_are_decided_at_start_up():
    # start-up runs a private redis-server then (erproxy/private_redis.py), or refuses without the binary
    assert Settings.from_env({"WORKERS": "4"}, env_file="").workers == 4
    assert Settings.from_env({"WORKERS": "4", "REDIS_URL": "redis://127.0.0.1:6379/0"}, env_file="").workers == 4


def test_workers_auto_is_one_per_cpu_core():
    s = Settings.from_env({"WORKERS": "auto"}, env_file="")
    assert s.workers == len(os.sched_getaffinity(0)) and s.workers_auto
    assert not Settings.from_env({"WORKERS": "3"}, env_file="").workers_auto
    with pytest.raises(SettingsError, match="WORKERS.*auto"):
        Settings.from_env({"WORKERS": "many"}, env_file="")


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


def test_generated_blocks_are_in_step_with_the_declarations():
    # .env.example and the README table are generated (python -m erproxy.settings): byte for byte
    from erproxy.settings import BLOCKS, read_block

    for file, (block, comment, generate) in BLOCKS.items():
        text = (ROOT / file).read_text()
        assert read_block(text, block, comment) == "\n" + generate(), \
            f"{file} is out of date; run: python -m erproxy.settings"


def test_each_knob_is_declared_once_with_default_and_meaning():
    from erproxy.settings import Settings

    assert [s.env for s in SPECS] == [name.upper() for name in Settings.model_fields]
    for spec in SPECS:
        assert spec.help.endswith("."), spec.env
    # the declared default goes through the same rules as a configured value
    assert Settings() == Settings.from_env({}, env_file="")
    assert Settings().max_body_bytes == 16 * 1024 * 1024 and Settings().log_level == "info"


def test_values_given_in_python_follow_the_same_rules():
    s = Settings(port=3000, embedding_upstreams=("http://a:1/",), log_json=True)
    assert (s.port, s.embedding_upstreams, s.log_json) == (3000, ("http://a:1",), True)
    with pytest.raises(SettingsError, match="PORT"):
        Settings(port=0)
    with pytest.raises(SettingsError, match="NO_SUCH_KNOB"):
        Settings(no_such_knob=1)


def test_dotenv_follows_python_dotenv_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("ERPROXY_TEST_HOST", "upstream.example")
    env_file = tmp_path / ".env"
    env_file.write_text("export EMBEDDING_UPSTREAMS=http://${ERPROXY_TEST_HOST}:8000\n"
                        "LOG_FORMAT='%(levelname)s %(message)s'  # a comment\n"
                        "REDIS_URL\n")
    s = Settings.from_env({}, env_file=env_file)
    assert s.embedding_upstreams == ("http://upstream.example:8000",)
    assert s.log_format == "%(levelname)s %(message)s"
    assert s.redis_url is None  # a name without a value is not set
    assert Settings.from_env({"ENV_FILE": str(env_file)}).log_format == "%(levelname)s %(message)s"


def test_old_single_service_variables_are_named_once_as_not_applicable(tmp_path):
    from erproxy.settings import not_applicable_line

    env_file = tmp_path / ".env"
    env_file.write_text("WORKER_CLASS=uvicorn.workers.UvicornWorker\nACCESS_TOKEN=old-token\nWORKERS=1\n")
    s = Settings.from_env({"WORKER_CONNECTIONS": "1000", "TIMEOUT": "120", "KEEP_ALIVE": "5"}, env_file=env_file)
    assert s.not_applicable == ("WORKER_CLASS", "WORKER_CONNECTIONS")
    assert (s.access_token, s.workers, s.timeout, s.keep_alive) == ("old-token", 1, 120.0, 5.0)  # these still work
    assert Settings.from_env({}, env_file="").not_applicable == ()
    assert not_applicable_line(Settings.from_env({}, env_file="")) is None

    lines = [m for m in start_up_messages(s, tmp_path / "keys.json", 1, tmp_path / "x.log") if "WORKER_" in m]
    assert len(lines) == 1, lines
    (line,) = lines
    assert "not applicable" in line and "WORKER_CLASS" in line and "WORKER_CONNECTIONS" in line
    assert "MAX_CONCURRENT_REQUESTS" in line and "WORKERS" in line.replace("WORKER_", "")


def test_rate_check_for_keys_create_is_the_settings_rule():
    from erproxy.settings import validate_rate_limit

    assert validate_rate_limit(" 300/minute ") == "300/minute"
    for bad in ("lots", "0/minute", "1/second;100/minute"):
        with pytest.raises(ValueError):
            validate_rate_limit(bad)


def test_start_up_line_shows_the_worker_count_workers_auto_chose():
    s = Settings.from_env({"WORKERS": "auto", "REDIS_URL": "unix:///tmp/x.sock"}, env_file="")
    text = "\n".join(start_up_messages(s, Path("keys.json"), 1, Path("x.log"), private_dir=Path("/srv/.redis")))
    assert f"workers={len(os.sched_getaffinity(0))}, auto: one per CPU core" in text
    assert "private redis-server (/srv/.redis)" in text


def test_unix_redis_urls_reach_the_limits_library_as_redis_unix():
    from erproxy.redis_admission import limits_storage_uri

    assert limits_storage_uri("unix:///run/redis.sock?db=0") == "redis+unix:///run/redis.sock?db=0"
    assert limits_storage_uri("redis://h:6379/0") == "redis://h:6379/0"


def test_an_env_file_named_but_missing_stops_start_up_instead_of_dropping_the_configuration(tmp_path):
    with pytest.raises(SettingsError, match="ENV_FILE=.*no such file"):
        Settings.from_env({"ENV_FILE": str(tmp_path / "erproxy.emv")})
    assert Settings.from_env({"ENV_FILE": ""}).port == 2048  # ENV_FILE= : no file at all
    assert Settings.from_env({}, env_file=tmp_path / "absent.env").port == 2048  # the default .env may be absent


def test_an_empty_value_means_the_default_not_false_or_an_empty_path():
    """DOCS= or API_KEYS_FILE= (what compose writes for `${X:-}`) is no value, as in the vLLM scripts."""
    s = Settings.from_env({"DOCS": "", "API_KEYS_FILE": "  ", "PORT": "", "HOST": "", "WORKERS": ""}, env_file="")
    assert (s.docs, s.api_keys_file, s.port, s.host, s.workers) == (True, "er_api_keys.json", 2048, "0.0.0.0", 1)


def test_an_upstream_url_without_a_host_is_refused():
    with pytest.raises(SettingsError, match="EMBEDDING_UPSTREAMS has a URL without a host"):
        Settings.from_env({"EMBEDDING_UPSTREAMS": "http://:8000"}, env_file="")
