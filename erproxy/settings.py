"""One Settings object from the environment (and `.env`): every knob declared once, in `Settings`.

Each field is one variable (its name upper-cased), declared with its type, the rule that reads
it (and its bounds), its default as an operator would write it in `.env`, and a one-line meaning.
`.env.example` and the README's configuration table are generated from these declarations
(`python -m erproxy.settings`) and a test keeps them in step. A bad value stops start-up with a
SettingsError that names the variable.

`Settings.from_env` reads the variables itself, with python-dotenv's rules for `.env`
(`dotenv_values`, `${VAR}` interpolation included): only these exact upper-case names, the
environment winning over the file, as with docker and systemd.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values
from limits import parse as parse_rate_limit
from pydantic import BeforeValidator, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


# ---- how a variable's text becomes a value (the variable's name comes from the field) -------------
def _reader(parse: Callable[[str, str], Any]) -> BeforeValidator:
    def read(raw: Any, info: ValidationInfo) -> Any:
        return parse(_as_text(raw), (info.field_name or "").upper())
    return BeforeValidator(read)


def _as_text(raw: Any) -> str:
    """Values given in Python (Settings(port=3000)) are read by the same rules as text."""
    if raw is None:
        return ""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (tuple, list)):
        return ",".join(map(str, raw))
    return str(raw)


def integer(lo: int, hi: int | None = None) -> BeforeValidator:
    return _reader(_integer_parser(lo, hi))


def _integer_parser(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(raw: str, name: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise SettingsError(f"{name} must be {bound}, got {value}")
        return value
    return parse


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity where the OS has one): WORKERS=auto."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _workers(raw: str, name: str) -> int:
    """A number of worker processes, or `auto`: one per CPU core."""
    if raw.strip().lower() == "auto":
        return min(cpu_count(), 1024)
    if not raw.strip().isdigit():
        raise SettingsError(f"{name} must be a number of processes or auto (one per CPU core), got {raw!r}")
    return _integer_parser(1, 1024)(raw, name)


def seconds(lo: float = 0, hi: float = 7 * 86400.0) -> BeforeValidator:
    def parse(raw: str, name: str) -> float:
        try:
            value = float(raw.strip().rstrip("s"))
        except ValueError:
            raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not lo < value <= hi:  # also refuses inf and nan
            raise SettingsError(f"{name} must be greater than {lo:g} and at most {hi:g} seconds, got {raw!r}")
        return value
    return _reader(parse)


def _flag(raw: str, name: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def _size(raw: str, name: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", raw)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise SettingsError(f"{name} must be a size such as 16777216 or 16MiB, got {raw!r}")
    value = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value < 1024:
        raise SettingsError(f"{name} must be at least 1024 bytes, got {value}")
    return value


def _size_or_off(raw: str, name: str) -> int:
    """A size, or 0 (off)."""
    if raw.strip() == "0":
        return 0
    return _size(raw, name)


def _urls(raw: str, name: str) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())
    if not urls:
        raise SettingsError(f"{name} must list at least one base URL such as http://127.0.0.1:8000")
    for u in urls:
        if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", u):
            raise SettingsError(f"{name} has an invalid URL {u!r}; expected e.g. http://127.0.0.1:8000")
        parts = urlsplit(u)
        if not parts.hostname:
            raise SettingsError(f"{name} has a URL without a host: {u!r}; expected e.g. http://127.0.0.1:8000")
        if parts.username or parts.password:
            raise SettingsError(f"{name} must not carry credentials (user:password@): they would show in "
                                "/health, metrics and logs")
        try:
            parts.port
        except ValueError:
            raise SettingsError(f"{name} has an invalid port in {u!r}") from None
    return urls


def _networks(raw: str, name: str) -> tuple[str, ...]:
    """Comma-separated IP addresses or networks (10.0.0.0/8, ::1), each normalised."""
    out = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SettingsError(f"{name} must list IP addresses or networks such as 10.0.0.5 or 10.0.0.0/8, "
                                f"got {item!r}") from None
    return tuple(out)


def validate_rate_limit(text: str) -> str:
    """One positive rate such as 100/minute; raises ValueError otherwise (also used by `keys create`)."""
    if any(sep in text for sep in ";,|"):
        raise ValueError(f"give one rate such as 100/minute, got {text!r}")
    try:
        item = parse_rate_limit(text.strip())
    except Exception:
        raise ValueError(f"a rate looks like 100/minute or 10/second, got {text!r}") from None
    if item.amount < 1:
        raise ValueError(f"a rate must allow at least one request, got {text!r}")
    return text.strip()


def _rate(raw: str, name: str) -> str:
    try:
        return validate_rate_limit(raw)
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None


def choice(*choices: str) -> BeforeValidator:
    def parse(raw: str, name: str) -> str:
        v = raw.strip().lower()
        if v not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return v
    return _reader(parse)


Text = Annotated[str, _reader(lambda raw, name: raw.strip())]
OptionalText = Annotated[str | None, _reader(lambda raw, name: raw.strip() or None)]
Flag = Annotated[bool, _reader(_flag)]
Size = Annotated[int, _reader(_size)]
SizeOrOff = Annotated[int, _reader(_size_or_off)]
Urls = Annotated[tuple[str, ...], _reader(_urls)]
Rate = Annotated[str, _reader(_rate)]
OptionalRate = Annotated[str | None, _reader(lambda raw, name: _rate(raw, name) if raw.strip() else None)]
Seconds = Annotated[float, seconds()]
Proxies = Annotated[tuple[str, ...], _reader(_networks)]


def knob(default: str, help: str) -> Any:
    """A variable's default, written as in `.env` ("" = unset), and its one-line meaning."""
    return Field(default, description=help)


class Settings(BaseSettings):
    """Every knob of the gateway. Settings() is the defaults; Settings.from_env() what is configured."""

    model_config = SettingsConfigDict(frozen=True, validate_default=True, extra="forbid")

    host: Text = knob("0.0.0.0", "Address the gateway listens on (`::`: IPv6 and IPv4 alike).")
    port: Annotated[int, integer(1, 65535)] = knob("2048", "Port the gateway listens on.")
    workers: Annotated[int, _reader(_workers)] = knob(
        "1", "Worker processes sharing the port (`auto`: one per CPU core). More than 1 shares limits, revocations, "
        "cache and usage through REDIS_URL or, unset, a private redis-server the gateway starts and stops itself "
        "(socket and data in `.redis/` beside API_KEYS_FILE).")
    server: Annotated[str, choice("uvicorn", "granian")] = knob(
        "uvicorn", "HTTP server: uvicorn (HTTP/1.1) or granian (HTTP/1.1 and HTTP/2 on the same port: h2 by ALPN "
        "with SSL_CERTFILE, else h2c by prior knowledge); see Server and HTTP/2.")
    timeout: Seconds = knob("600", "Seconds an upstream request may take before the client gets 504.")
    keep_alive: Seconds = knob(
        "75", "Seconds an idle client connection is kept open (idle upstream connections: at most 4 s, under vLLM's 5 s).")
    embedding_upstreams: Urls = knob("http://127.0.0.1:8000", "Comma-separated base URLs of vLLM embedding servers.")
    reranker_upstreams: Urls = knob("http://127.0.0.1:8001", "Comma-separated base URLs of vLLM reranker servers.")
    embedding_model: OptionalText = knob(
        "", "Model used when an embeddings request omits `model` (default: the first one the embedding upstreams serve).")
    reranker_model: OptionalText = knob(
        "", "Model used when a rerank request omits `model` (default: the first one the reranker upstreams serve).")
    embedding_query_instruction: Text = knob(
        "Given a web search query, retrieve relevant passages that answer the query",
        "Default instruction for Qwen3 embedding queries (`input_type: query`).")
    accept_token_ids: Flag = knob(
        "false", "Accept token-id arrays as embeddings `input` (only for clients that tokenize with the served "
        "model's own tokenizer; else 400 token_ids_not_accepted).")
    api_keys_file: Text = knob("er_api_keys.json", "Key file (hashes only); created with one key on first start.")
    access_token: OptionalText = knob("", "Optional extra static key, accepted like any other key.")
    auth_failure_limit: Annotated[int, integer(0)] = knob(
        "10", "Unknown keys one client address may send per AUTH_FAILURE_WINDOW (revoked or expired ones do not count); then it gets "
        "429 too_many_auth_failures until the window ends (0 = no limit).")
    auth_failure_window: Seconds = knob("60", "Seconds over which AUTH_FAILURE_LIMIT counts an address's failures.")
    auth_failure_ipv6_prefix: Annotated[int, integer(1, 128)] = knob(
        "64", "AUTH_FAILURE_LIMIT counts IPv6 clients per network of this many bits (a subscriber has a whole /64); "
        "128 = each address alone, for clouds where unrelated hosts share a /64.")
    trusted_proxies: Proxies = knob(
        "", "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For names the client "
        "(for AUTH_FAILURE_LIMIT); unset = the connecting address is the client.")
    rate_limit: Rate = knob("100/minute", "Per-key rate limit (moving window).")
    token_limit: OptionalRate = knob(
        "", "Prompt tokens per key and window, e.g. 100000/minute, for keys without their own --token-limit "
        "(unset: none); over it a key gets 429 token_limit_exceeded.")
    max_concurrent_requests: Annotated[int, integer(1)] = knob(
        "500", "Requests served at once; more get 429 concurrency_limit_exceeded.")
    body_timeout: Seconds = knob("30", "Seconds a client may take to send its request body; slower gets 408.")
    max_body_bytes: Size = knob("16MiB", "Largest request body accepted; more gets 413.")
    max_answer_bytes: Size = knob(
        "256MiB", "Largest answer read from an upstream (vLLM's JSON for 2,048 inputs of 4,096 floats is ~170 MB); "
        "a larger one is dropped unread and the client gets 502 upstream_answer_too_large.")
    health_interval: Seconds = knob("10", "Seconds between active health checks of each upstream.")
    ssl_certfile: OptionalText = knob("", "PEM certificate (chain): with SSL_KEYFILE the gateway serves HTTPS.")
    ssl_keyfile: OptionalText = knob("", "PEM private key for SSL_CERTFILE.")
    metrics_token: OptionalText = knob("", "If set, GET /metrics needs it as a bearer token (else /metrics is open).")
    docs: Flag = knob("true", "Serve the API documentation: GET /docs (Swagger UI), /openapi.json, / redirects to /docs.")
    log_dir: Text = knob("logs", "Directory of embedding_reranker_proxy.log.")
    log_level: Annotated[str, choice("debug", "info", "warning", "error")] = knob("INFO", "Log level.")
    log_format: Text = knob("%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s",
                            "Python logging format of log lines.")
    log_json: Flag = knob("false", "Write access log lines as JSON objects.")
    log_max_bytes: Size = knob("20MiB", "Size at which the log file is rotated.")
    log_backups: Annotated[int, integer(1, 1000)] = knob("5", "Rotated log files kept.")
    redis_url: OptionalText = knob(
        "", "Redis shared by workers/instances for limits, revocations, cache and usage (unset = in-process state; "
        "with WORKERS>1 a private redis-server, see WORKERS).")
    redis_fail_open: Flag = knob(
        "false", "When Redis is unreachable: false = answer 503, true = admit under per-process limits.")
    cache_max_bytes: SizeOrOff = knob(
        "256MiB", "In-process item cache (embedding vectors, rerank scores) of each worker; 0 turns the cache off.")
    cache_scope: Annotated[str, choice("key", "shared")] = knob(
        "key", "Whose requests a cached item answers: key (each API key its own entries: no key learns from "
        "X-Cache-Hits what another sent) or shared (one cache for all keys: more hits where keys send the same texts).")
    cache_redis_max_bytes: SizeOrOff = knob(
        "1GiB", "Redis memory (its used_memory, limits and usage included) above which the item cache writes no "
        "new entries to Redis until old ones expire (CACHE_TTL); 0 = no bound.")
    cache_ttl: Annotated[float, seconds(1, 365 * 86400.0)] = knob(
        "86400", "Seconds a cached item lives in Redis (with REDIS_URL the cache is shared by workers and instances).")
    split_embedding_inputs: Annotated[int, integer(1)] = knob(
        "32", "An embeddings request with more inputs is split across the healthy replicas of its model (needs 2+).")
    split_rerank_documents: Annotated[int, integer(1)] = knob(
        "32", "A rerank request with more documents is split across the healthy replicas of its model (needs 2+).")
    auto_truncate: Flag = knob(
        "false", "Truncate every too-long input to the model's max_model_len unless the request says otherwise "
        "(false: vLLM's 400 unless the request asks for truncation).")
    shutdown_grace: Seconds = knob("30", "Seconds SIGTERM waits for in-flight requests before closing connections.")

    _not_applicable: tuple[str, ...] = PrivateAttr(default=())
    _workers_auto: bool = PrivateAttr(default=False)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise SettingsError(_first_message(e)) from None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # from_env reads the environment and .env itself, by python-dotenv's rules

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = None) -> "Settings":
        """Read every knob from `environ` (default os.environ), falling back to `env_file`, then defaults.

        Variables already in the environment win over `.env`, as with docker and systemd.
        """
        env = dict(os.environ if environ is None else environ)
        if env_file is None:
            env_file = env.get("ENV_FILE", ".env")
            if env.get("ENV_FILE") and not Path(env_file).is_file():  # named, so meant: a typo must not pass
                raise SettingsError(f"ENV_FILE={env_file}: no such file (ENV_FILE= reads no file; unset, "
                                    ".env if it exists)")
        file_values: dict[str, str] = {}
        if env_file and Path(env_file).is_file():
            file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        # an empty value is no value, as `: "${VAR:=default}"` in the vLLM scripts and pydantic-settings'
        # env_ignore_empty have it: DOCS= or API_KEYS_FILE= (a compose `${X:-}`) means the default, not
        # false or a key file named ''
        merged = {k: v for k, v in {**file_values, **env}.items() if v.strip()}
        settings = cls(**{name: merged[name.upper()] for name in cls.model_fields if name.upper() in merged})
        settings._not_applicable = tuple(name for name in NOT_APPLICABLE if name in merged)
        settings._workers_auto = str(merged.get("WORKERS", "")).strip().lower() == "auto"
        return settings

    @property
    def workers_auto(self) -> bool:
        """WORKERS=auto: `workers` is this host's CPU count."""
        return self._workers_auto

    @property
    def not_applicable(self) -> tuple[str, ...]:
        """Variables set for another server (an old gunicorn set-up) that mean nothing here."""
        return self._not_applicable

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.redis_url and urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(f"REDIS_URL must look like redis://host:6379/0 (or rediss://, unix://), "
                                f"got a URL with scheme {urlsplit(self.redis_url).scheme or 'none'!r}")
        try:
            logging.Formatter(self.log_format).format(logging.LogRecord("x", logging.INFO, "", 0, "m", None, None))
        except (ValueError, KeyError, TypeError) as e:
            raise SettingsError(f"LOG_FORMAT cannot format a log line: {e!r}") from None
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise SettingsError("SSL_CERTFILE and SSL_KEYFILE must be set together to serve HTTPS.")
        for name, path in (("SSL_CERTFILE", self.ssl_certfile), ("SSL_KEYFILE", self.ssl_keyfile)):
            if path and not Path(path).is_file():
                raise SettingsError(f"{name} points to {path!r}, which is not a readable file.")
        return self


def _first_message(e: ValidationError) -> str:
    err = e.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SettingsError):
        return str(cause)
    name = ".".join(str(x) for x in err["loc"]).upper() or "configuration"
    return f"{name}: {err['msg']}"


# Variables of the single-service reranker's gunicorn set-up: accepted in an old .env, ignored here.
NOT_APPLICABLE = {
    "WORKER_CLASS": "uvicorn workers are built in; set WORKERS for more processes",
    "WORKER_CONNECTIONS": "use MAX_CONCURRENT_REQUESTS to cap requests served at once",
}


def not_applicable_line(settings: Settings) -> str | None:
    """The one log line naming each variable set for another server, with what to use instead."""
    if not settings.not_applicable:
        return None
    return "not applicable to this gateway, ignored: " + "; ".join(
        f"{name} ({NOT_APPLICABLE[name]})" for name in settings.not_applicable)


# ---- generated documentation: .env.example and the README table -------------------------------------
@dataclass(frozen=True)
class Spec:
    """A variable as documented: name, default as written in .env ("" = unset), meaning."""

    env: str
    default: str
    help: str


SPECS: tuple[Spec, ...] = tuple(Spec(name.upper(), f.default, f.description or "")
                                for name, f in Settings.model_fields.items())


def env_example_block() -> str:
    lines = []
    for s in SPECS:
        value = f'"{s.default}"' if any(c in s.default for c in " %#") else s.default
        lines += [f"# {s.help}", f"{'#' if not s.default else ''}{s.env}={value}", ""]
    return "\n".join(lines).rstrip() + "\n"


def markdown_table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for s in SPECS:
        d = s.default.replace("|", "\\|")
        rows.append(f"| `{s.env}` | {'`' + d + '`' if d else '(unset)'} | {s.help} |")
    return "\n".join(rows) + "\n"


BLOCKS = {  # file (from the repository root) -> (block name, its comment markers, generator)
    ".env.example": ("gateway", ("#", ""), env_example_block),
    "README.md": ("config-table", ("<!--", "-->"), markdown_table),
}


def block_markers(name: str, comment: tuple[str, str]) -> tuple[str, str]:
    return (f"{comment[0]} {name}:start {comment[1]}".strip(), f"{comment[0]} {name}:end {comment[1]}".strip())


def read_block(text: str, name: str, comment: tuple[str, str]) -> str:
    start, end = block_markers(name, comment)
    return text[text.index(start) + len(start):text.index(end)]


def _replace_block(path: Path, name: str, body: str, comment: tuple[str, str]) -> None:
    start, end = block_markers(name, comment)
    text = path.read_text()
    i, j = text.index(start) + len(start), text.index(end)
    path.write_text(text[:i] + "\n" + body + text[j:])


if __name__ == "__main__":  # python -m erproxy.settings: refresh .env.example and the README table
    root = Path(__file__).resolve().parents[1]
    for file, (block, comment, generate) in BLOCKS.items():
        _replace_block(root / file, block, generate(), comment)
