"""One Settings object from the environment (and `.env`).

Each knob is declared once in SPECS with its default and a one-line description; `.env.example`
and the README table are checked against SPECS by the tests. A bad value stops start-up with a
message that names the variable.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values
from limits import parse as parse_rate_limit


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def _int(name: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    def conv(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise SettingsError(f"{name} must be {bound}, got {value}")
        return value
    return conv


def _float(name: str, lo: float, hi: float = 7 * 86400.0) -> Callable[[str], float]:
    def conv(raw: str) -> float:
        try:
            value = float(raw.strip().rstrip("s"))
        except ValueError:
            raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not lo < value <= hi:  # also refuses inf and nan
            raise SettingsError(f"{name} must be greater than {lo:g} and at most {hi:g} seconds, got {raw!r}")
        return value
    return conv


def _bool(name: str) -> Callable[[str], bool]:
    def conv(raw: str) -> bool:
        v = raw.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    return conv


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def _size(name: str) -> Callable[[str], int]:
    def conv(raw: str) -> int:
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", raw)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise SettingsError(f"{name} must be a size such as 16777216 or 16MiB, got {raw!r}")
        value = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if value < 1024:
            raise SettingsError(f"{name} must be at least 1024 bytes, got {value}")
        return value
    return conv


def _urls(name: str) -> Callable[[str], tuple[str, ...]]:
    def conv(raw: str) -> tuple[str, ...]:
        urls = tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())
        if not urls:
            raise SettingsError(f"{name} must list at least one base URL such as http://127.0.0.1:8000")
        for u in urls:
            if not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", u):
                raise SettingsError(f"{name} has an invalid URL {u!r}; expected e.g. http://127.0.0.1:8000")
            parts = urlsplit(u)
            if parts.username or parts.password:
                raise SettingsError(f"{name} must not carry credentials (user:password@): they would show in "
                                    "/health, metrics and logs")
            try:
                parts.port
            except ValueError:
                raise SettingsError(f"{name} has an invalid port in {u!r}") from None
        return urls
    return conv


def check_rate(text: str) -> str:
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


def _rate(name: str) -> Callable[[str], str]:
    def conv(raw: str) -> str:
        try:
            return check_rate(raw)
        except ValueError as e:
            raise SettingsError(f"{name}: {e}") from None
    return conv


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def conv(raw: str) -> str:
        v = raw.strip().lower()
        if v not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return v
    return conv


def _text(raw: str) -> str:
    return raw.strip()


def _optional(raw: str) -> str | None:
    return raw.strip() or None


@dataclass(frozen=True)
class Spec:
    env: str
    default: str
    convert: Callable[[str], Any]
    help: str


SPECS: tuple[Spec, ...] = (
    Spec("HOST", "0.0.0.0", _text, "Address the gateway listens on."),
    Spec("PORT", "2048", _int("PORT", 1, 65535), "Port the gateway listens on."),
    Spec("WORKERS", "1", _int("WORKERS", 1, 1024), "Worker processes sharing the port."),
    Spec("TIMEOUT", "600", _float("TIMEOUT", 0), "Seconds an upstream request may take before the client gets 504."),
    Spec("KEEP_ALIVE", "75", _float("KEEP_ALIVE", 0),
         "Seconds an idle client connection is kept open (idle upstream connections: at most 4 s, under vLLM's 5 s)."),
    Spec("EMBEDDING_UPSTREAMS", "http://127.0.0.1:8000", _urls("EMBEDDING_UPSTREAMS"),
         "Comma-separated base URLs of vLLM embedding servers."),
    Spec("RERANKER_UPSTREAMS", "http://127.0.0.1:8001", _urls("RERANKER_UPSTREAMS"),
         "Comma-separated base URLs of vLLM reranker servers."),
    Spec("EMBEDDING_MODEL", "", _optional,
         "Model used when an embeddings request omits `model` (default: the first one the embedding upstreams serve)."),
    Spec("RERANKER_MODEL", "", _optional,
         "Model used when a rerank request omits `model` (default: the first one the reranker upstreams serve)."),
    Spec("EMBEDDING_QUERY_INSTRUCTION", "Given a web search query, retrieve relevant passages that answer the query",
         _text, "Default instruction for Qwen3 embedding queries (`input_type: query`)."),
    Spec("API_KEYS_FILE", "er_api_keys.json", _text, "Key file (hashes only); created with one key on first start."),
    Spec("ACCESS_TOKEN", "", _optional, "Optional extra static key, accepted like any other key."),
    Spec("RATE_LIMIT", "100/minute", _rate("RATE_LIMIT"), "Per-key rate limit (moving window)."),
    Spec("MAX_CONCURRENT_REQUESTS", "500", _int("MAX_CONCURRENT_REQUESTS", 1),
         "Requests served at once; more get 429 concurrency_limit_exceeded."),
    Spec("BODY_TIMEOUT", "30", _float("BODY_TIMEOUT", 0),
         "Seconds a client may take to send its request body; slower gets 408."),
    Spec("MAX_BODY_BYTES", "16MiB", _size("MAX_BODY_BYTES"), "Largest request body accepted; more gets 413."),
    Spec("HEALTH_INTERVAL", "10", _float("HEALTH_INTERVAL", 0), "Seconds between active health checks of each upstream."),
    Spec("SSL_CERTFILE", "", _optional, "PEM certificate (chain): with SSL_KEYFILE the gateway serves HTTPS."),
    Spec("SSL_KEYFILE", "", _optional, "PEM private key for SSL_CERTFILE."),
    Spec("METRICS_TOKEN", "", _optional, "If set, GET /metrics needs it as a bearer token (else /metrics is open)."),
    Spec("LOG_DIR", "logs", _text, "Directory of embedding_reranker_proxy.log."),
    Spec("LOG_LEVEL", "INFO", _choice("LOG_LEVEL", ("debug", "info", "warning", "error")), "Log level."),
    Spec("LOG_FORMAT", "%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s", _text, "Python logging format of log lines."),
    Spec("LOG_JSON", "false", _bool("LOG_JSON"), "Write access log lines as JSON objects."),
    Spec("LOG_MAX_BYTES", "20MiB", _size("LOG_MAX_BYTES"), "Size at which the log file is rotated."),
    Spec("LOG_BACKUPS", "5", _int("LOG_BACKUPS", 1, 1000), "Rotated log files kept."),
    Spec("REDIS_URL", "", _optional, "Redis shared by workers/instances for limits (unset = in-process state)."),
    Spec("REDIS_FAIL_OPEN", "false", _bool("REDIS_FAIL_OPEN"),
         "When Redis is unreachable: false = answer 503, true = admit under per-process limits."),
    Spec("SHUTDOWN_GRACE", "30", _float("SHUTDOWN_GRACE", 0),
         "Seconds SIGTERM waits for in-flight requests before closing connections."),
)


def _field_name(env: str) -> str:
    return env.lower()


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    workers: int
    timeout: float
    keep_alive: float
    embedding_upstreams: tuple[str, ...]
    reranker_upstreams: tuple[str, ...]
    embedding_model: str | None
    reranker_model: str | None
    embedding_query_instruction: str
    api_keys_file: str
    access_token: str | None
    rate_limit: str
    max_concurrent_requests: int
    body_timeout: float
    max_body_bytes: int
    health_interval: float
    ssl_certfile: str | None
    ssl_keyfile: str | None
    metrics_token: str | None
    log_dir: str
    log_level: str
    log_format: str
    log_json: bool
    log_max_bytes: int
    log_backups: int
    redis_url: str | None
    redis_fail_open: bool
    shutdown_grace: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = None) -> "Settings":
        """Read every knob from `environ` (default os.environ), falling back to `env_file`, then defaults.

        Variables already in the environment win over `.env`, as with docker and systemd.
        """
        env = dict(os.environ if environ is None else environ)
        if env_file is None:
            env_file = env.get("ENV_FILE", ".env")
        file_values: dict[str, str] = {}
        if env_file and Path(env_file).is_file():
            file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        values: dict[str, Any] = {}
        for spec in SPECS:
            raw = env.get(spec.env, file_values.get(spec.env, spec.default))
            values[_field_name(spec.env)] = spec.convert(raw)
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def defaults(cls, **overrides: Any) -> "Settings":
        """Settings from defaults only, with keyword overrides (for tests and embedding)."""
        values = {_field_name(s.env): s.convert(s.default) for s in SPECS}
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
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
        if self.workers > 1 and not self.redis_url:
            raise SettingsError(
                f"WORKERS={self.workers} needs REDIS_URL: without a shared Redis the limits would be per process "
                "(each worker keeping its own rate limits and concurrency count), so clients would get up to "
                "WORKERS times the configured limits. "
                "Set REDIS_URL=redis://host:6379/0 or use WORKERS=1."
            )


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


def _replace_block(path: Path, name: str, body: str, comment: tuple[str, str]) -> None:
    start, end = f"{comment[0]} {name}:start {comment[1]}".strip(), f"{comment[0]} {name}:end {comment[1]}".strip()
    text = path.read_text()
    i, j = text.index(start) + len(start), text.index(end)
    path.write_text(text[:i] + "\n" + body + text[j:])


if __name__ == "__main__":  # python -m erproxy.settings: refresh .env.example and the README table
    root = Path(__file__).resolve().parents[1]
    _replace_block(root / ".env.example", "gateway", env_example_block(), ("#", ""))
    _replace_block(root / "README.md", "config-table", markdown_table(), ("<!--", "-->"))
