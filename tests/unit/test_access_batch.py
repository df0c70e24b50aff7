"""Access lines are written in batches (erproxy/logs.py): same text as the logging module would
write, every line kept, the lines of several loop turns in one write within flushing.FLUSH_WINDOW_S."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from erproxy import logs
from erproxy.flushing import FLUSH_WINDOW_S
from erproxy.logs import AccessBatch, Formatter, SharedRotatingFileHandler

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s"


def test_the_formatter_writes_what_logging_writes() -> None:
    plain, ours = logging.Formatter(FORMAT), Formatter(FORMAT)
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_001.0):
        record = logging.LogRecord("erproxy.access", logging.INFO, "", 0, "key=a status=200", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == plain.format(record)
    dated = logging.LogRecord("x", logging.INFO, "", 0, "m", None, None)
    assert Formatter("%(asctime)s", "%H:%M").format(dated) == logging.Formatter("%(asctime)s", "%H:%M").format(dated)


@pytest.fixture
def access_at_info(monkeypatch):
    """The access logger at INFO for this test (setLevel also clears the logger's isEnabledFor cache)."""
    before = logs.access_log.level
    monkeypatch.setattr(logging.root.manager, "disable", 0)
    logs.access_log.setLevel(logging.INFO)
    yield
    logs.access_log.setLevel(before)


class CountingStream(io.StringIO):
    writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.mark.asyncio
async def test_lines_within_the_flush_window_go_out_in_one_write(tmp_path, monkeypatch, access_at_info) -> None:
    stream = CountingStream()
    console = logging.StreamHandler(stream)
    console.setFormatter(Formatter("%(name)s %(message)s"))
    file_handler = SharedRotatingFileHandler(tmp_path / "gw.log", 1 << 20, 2)
    file_handler.setFormatter(Formatter("%(name)s %(message)s"))
    batch = AccessBatch([file_handler, console])
    monkeypatch.setattr(logs, "_batch", batch)
    for i in range(50):
        logs.log_access(who="k", method="POST", route="/v1/embeddings", model="m", items=i, status=200,
                        latency_ms=1.25, upstream=None)
        if i == 24:
            await asyncio.sleep(0)  # a turn of the loop: the lines wait for the window's end
    assert stream.getvalue() == "", "nothing is written before the window ends"
    await asyncio.sleep(FLUSH_WINDOW_S * 3)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 50 and stream.writes == 1
    assert lines[7] == "erproxy.access key=k POST /v1/embeddings model=m items=7 status=200 latency_ms=1.2 upstream=-"
    file_handler.close()
    assert (tmp_path / "gw.log").read_text().splitlines() == lines


def test_without_an_event_loop_a_line_is_written_at_once(monkeypatch, access_at_info) -> None:
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    console.setFormatter(Formatter("%(message)s"))
    monkeypatch.setattr(logs, "_batch", AccessBatch([console]))
    logs.log_access(who="k", method="GET", route="/v1/models", model=None, items=None, status=200,
                    latency_ms=0.5, upstream=None, note="auth=ok")
    assert stream.getvalue() == "key=k GET /v1/models model=- items=- status=200 latency_ms=0.5 upstream=- auth=ok\n"


def test_a_key_name_written_by_hand_with_a_newline_cannot_forge_an_access_line(monkeypatch, access_at_info) -> None:
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    console.setFormatter(Formatter("%(message)s"))
    monkeypatch.setattr(logs, "_batch", AccessBatch([console]))
    logs.log_access(who="ops\nkey=admin POST /v1/keys", method="GET", route="/v1/models", model=None, items=None,
                    status=200, latency_ms=0.5, upstream=None)
    assert stream.getvalue().count("\n") == 1
    assert stream.getvalue().startswith("key=ops\\x0akey=admin\\x20POST\\x20/v1/keys GET /v1/models")


def test_lines_left_by_a_loop_that_ended_go_out_with_the_next_line_outside_any_loop(monkeypatch,
                                                                                    access_at_info) -> None:
    stream = io.StringIO()
    console = logging.StreamHandler(stream)
    console.setFormatter(Formatter("%(message)s"))
    monkeypatch.setattr(logs, "_batch", AccessBatch([console]))

    def line(route: str) -> None:
        logs.log_access(who="k", method="GET", route=route, model=None, items=None, status=200,
                        latency_ms=0.5, upstream=None)

    async def in_a_loop() -> None:
        line("/v1/models")  # its flush is due on this loop, which ends before the window does

    asyncio.run(in_a_loop())
    line("/health")  # no loop now: written at once, with the one left behind
    assert [x.split()[2] for x in stream.getvalue().splitlines()] == ["/v1/models", "/health"]


def test_the_log_file_is_written_again_once_its_folder_is_back(tmp_path, monkeypatch) -> None:
    """A reopen that fails (the folder removed, or the new file not writable for a moment) must not leave a
    closed stream behind that fails every later write: the next write opens the file afresh."""
    monkeypatch.setattr(logging, "raiseExceptions", False)  # handleError's traceback on stderr: expected here
    folder = tmp_path / "logs"
    folder.mkdir()
    handler = SharedRotatingFileHandler(folder / "gw.log", 1 << 20, 2)
    handler.setFormatter(Formatter("%(message)s"))

    def write(text: str) -> None:
        handler.emit(logging.LogRecord("erproxy", logging.INFO, "", 0, text, None, None))

    write("one")
    (folder / "gw.log").unlink()
    folder.rmdir()
    write("lost: there is nowhere to write it")
    folder.mkdir()
    (folder / "gw.log").touch()  # as another worker, whose open succeeded, creates it
    write("two")
    handler.emit_text("three\n")
    handler.close()
    assert (folder / "gw.log").read_text() == "two\nthree\n"
