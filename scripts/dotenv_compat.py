#!/usr/bin/env python3
"""Read `.env` with python-dotenv's rules, for the shell scripts (stdlib only).

The gateway reads `.env` with python-dotenv (`dotenv_values`); the scripts run under the system
`python3`, which may not have it. This is a line-for-line port of python-dotenv 1.2's parser and
`${VAR}` / `${VAR:-default}` expansion, so both read one file the same way (tests/scripts compares
them on a deliberately tricky file):

  - `KEY=value`, optional `export `, blank lines and `# comments`;
  - unquoted values end at ` #` (an inline comment) and are stripped;
  - 'single quotes': only \\\\ and \\' are escapes; "double quotes": \\n, \\t, \\", \\\\ ... are;
    quoted values may span lines;
  - `${VAR}` and `${VAR:-default}` are expanded in every value (quoted or not), from keys defined
    earlier in the file first, then the environment; a key without `=` has no value.

    python3 scripts/dotenv_compat.py FILE   prints `export KEY=...` (shell-quoted) for each key of
                                            FILE not already in the environment (the environment
                                            wins, as for the gateway), then ERP_DOTENV_KEYS.
"""
from __future__ import annotations

import codecs
import os
import re
import shlex
import sys
from typing import Iterator, Mapping, NamedTuple, Optional

_newline = re.compile(r"(\r\n|\n|\r)")
_multiline_whitespace = re.compile(r"\s*", re.MULTILINE)
_whitespace = re.compile(r"[^\S\r\n]*")
_export = re.compile(r"(?:export[^\S\r\n]+)?")
_single_quoted_key = re.compile(r"'([^']+)'")
_unquoted_key = re.compile(r"([^=\#\s]+)")
_equal_sign = re.compile(r"(=[^\S\r\n]*)")
_single_quoted_value = re.compile(r"'((?:\\.|[^'\\])*)'", re.DOTALL)
_double_quoted_value = re.compile(r'"((?:\\.|[^"\\])*)"', re.DOTALL)
_unquoted_value = re.compile(r"([^\r\n]*)")
_comment = re.compile(r"(?:[^\S\r\n]*#[^\r\n]*)?")
_end_of_line = re.compile(r"[^\S\r\n]*(?:\r\n|\n|\r|$)")
_rest_of_line = re.compile(r"[^\r\n]*(?:\r|\n|\r\n)?")
_double_quote_escapes = re.compile(r"\\[\\'\"abfnrtv]")
_single_quote_escapes = re.compile(r"\\[\\']")
_posix_variable = re.compile(r"\$\{(?P<name>[^\}:]*)(?::-(?P<default>[^\}]*))?\}")


# Variables bash sets itself (read-only or special): assigning them would break the script.
_SHELL_OWN = {"UID", "EUID", "PPID", "SHELLOPTS", "GROUPS", "FUNCNAME", "LINENO", "RANDOM", "SECONDS",
              "IFS", "OPTIND", "OPTARG", "PIPESTATUS", "DIRSTACK", "HISTCMD", "EPOCHSECONDS",
              "EPOCHREALTIME", "SRANDOM"}


class _Error(Exception):
    pass


class _Reader:
    def __init__(self, text: str) -> None:
        self.string = text[1:] if text.startswith("\ufeff") else text
        self.pos = 0

    def has_next(self) -> bool:
        return self.pos < len(self.string)

    def peek(self, count: int) -> str:
        return self.string[self.pos:self.pos + count]

    def read_regex(self, regex: "re.Pattern[str]") -> tuple:
        match = regex.match(self.string, self.pos)
        if match is None:
            raise _Error("pattern not found")
        self.pos = match.end()
        return match.groups()


def _decode_escapes(regex: "re.Pattern[str]", string: str) -> str:
    return regex.sub(lambda m: codecs.decode(m.group(0), "unicode-escape"), string)


class Binding(NamedTuple):
    key: Optional[str]
    value: Optional[str]


def _parse_value(reader: _Reader) -> str:
    char = reader.peek(1)
    if char == "'":
        (value,) = reader.read_regex(_single_quoted_value)
        return _decode_escapes(_single_quote_escapes, value)
    if char == '"':
        (value,) = reader.read_regex(_double_quoted_value)
        return _decode_escapes(_double_quote_escapes, value)
    if char in ("", "\n", "\r"):
        return ""
    (part,) = reader.read_regex(_unquoted_value)
    return re.sub(r"\s+#.*", "", part).rstrip()


def _parse_binding(reader: _Reader) -> Binding:
    try:
        reader.read_regex(_multiline_whitespace)
        if not reader.has_next():
            return Binding(None, None)
        reader.read_regex(_export)
        char = reader.peek(1)
        if char == "#":
            key = None
        elif char == "'":
            (key,) = reader.read_regex(_single_quoted_key)
        else:
            (key,) = reader.read_regex(_unquoted_key)
        reader.read_regex(_whitespace)
        value: Optional[str]
        if reader.peek(1) == "=":
            (equal_sign,) = reader.read_regex(_equal_sign)
            if len(equal_sign) > 1 and reader.peek(1) == "#":
                value = ""  # `KEY= # comment`
            else:
                value = _parse_value(reader)
        else:
            value = None
        reader.read_regex(_comment)
        reader.read_regex(_end_of_line)
        return Binding(key, value)
    except _Error:
        reader.read_regex(_rest_of_line)  # python-dotenv skips a line it cannot parse
        return Binding(None, None)


def parse(text: str) -> Iterator[Binding]:
    reader = _Reader(text)
    while reader.has_next():
        binding = _parse_binding(reader)
        if binding.key is not None:
            yield binding


def _expand(value: str, env: Mapping[str, Optional[str]]) -> str:
    def repl(m: "re.Match[str]") -> str:
        result = env.get(m["name"], m["default"] if m["default"] is not None else "")
        return result if result is not None else ""
    return _posix_variable.sub(repl, value)


def dotenv_values(path: str, environ: Mapping[str, str] | None = None) -> dict[str, Optional[str]]:
    """What python-dotenv's dotenv_values(path) returns (interpolation on, file values first)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    environ = os.environ if environ is None else environ
    values: dict[str, Optional[str]] = {}
    for key, value in parse(text):
        values[key] = None if value is None else _expand(value, {**environ, **values})
    return values


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: dotenv_compat.py FILE", file=sys.stderr)
        return 2
    try:
        values = dotenv_values(argv[1])
    except (OSError, UnicodeDecodeError) as e:
        print(f"cannot read {argv[1]}: {e}", file=sys.stderr)
        return 1
    keys = []
    for key, value in values.items():
        # The gateway skips keys without a value; the shell can only hold variable-like names.
        if value is None or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or key in os.environ:
            continue
        if key in _SHELL_OWN or key.startswith("BASH"):
            print(f"# {key} in {argv[1]} is ignored: the shell owns that name", file=sys.stderr)
            continue
        print(f"export {key}={shlex.quote(value)}")
        keys.append(key)
    print(f"ERP_DOTENV_KEYS={shlex.quote(' '.join(keys))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
