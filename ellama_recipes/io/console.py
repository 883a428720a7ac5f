"""The console filter: engine log lines to a log file, ellama's own lines to the console.

NeMo, Lightning, megatron-core and torchrun write their log lines straight to the process's file descriptors 1 and 2
(Python ``logging`` handlers, C-level prints, forked DataLoader workers), so a Python-level redirect does not catch
them. :func:`console_to_log` points fds 1 and 2 at a pipe for the duration of a block; a reader thread appends every
line to the current log file and forwards to the real console only the lines that are ellama's own (they start with
one of ``OWN_PREFIXES``: stage headers, progress, results), or every line with ``verbose=True``.

    with console_to_log(run / "logs" / "console.log") as logs:
        ...                              # NeMo's lines end up in that file
        logs.switch(other / "console.log")  # the next stage's lines go to its own run folder
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

OWN_PREFIXES = (b"[ellama]", b"[quickstart]", b"[tiny base]", b"[eval]")
_SENTINEL = b"\x00ellama-console-detach\x00\n"


class _Router:
    def __init__(self, log: Path, console_fd: int, verbose: bool, prefixes: tuple[bytes, ...]) -> None:
        self.console_fd, self.verbose, self.prefixes = console_fd, verbose, prefixes
        self.lock = threading.Lock()
        self.detached = threading.Event()
        self.file = None
        self.path: Path | None = None
        self.switch(log)

    def switch(self, log: Path) -> None:
        """Send the lines from now on to ``log`` (appended; its folder is created)."""
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        _flush()
        with self.lock:
            if self.file is not None:
                self.file.close()
            self.file, self.path = open(log, "ab"), log  # noqa: SIM115 (closed on switch / exit)

    def line(self, raw: bytes) -> None:
        with self.lock:
            if self.file is not None and not self.file.closed:
                self.file.write(raw)
                self.file.flush()
        if self.detached.is_set():
            return
        shown = raw.rsplit(b"\r", 1)[-1] if b"\r" in raw.rstrip(b"\r\n") else raw
        if self.verbose or shown.lstrip().startswith(self.prefixes):
            os.write(self.console_fd, shown)

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()


def _flush() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (OSError, ValueError):
            pass


def _reader(fd: int, router: _Router) -> None:
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            raw += b"\n"
            if raw == _SENTINEL:
                router.detached.set()
                continue
            router.line(raw)
    if buf:
        router.line(buf)


@contextmanager
def console_to_log(log: Path, *, verbose: bool = False,
                   prefixes: tuple[bytes, ...] = OWN_PREFIXES) -> Iterator[_Router]:
    """Route fds 1 and 2 through the filter described in the module docstring for the duration of the block.

    After the block the console is restored; DataLoader workers forked inside it may still hold the pipe, so the
    reader keeps draining it into the last log file (never onto the console) until they exit."""
    _flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    r, w = os.pipe()
    router = _Router(log, saved_out, verbose, prefixes)
    thread = threading.Thread(target=_reader, args=(r, router), name="ellama-console-log", daemon=True)
    thread.start()
    os.dup2(w, 1)
    os.dup2(w, 2)
    try:
        yield router
    finally:
        _flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.write(w, _SENTINEL)  # everything written before this line is forwarded; then the reader detaches
        os.close(w)
        router.detached.wait(timeout=10)
        thread.join(timeout=0.5)  # returns at once when no forked worker holds the pipe any more
        if not thread.is_alive():
            router.close()
            os.close(r)
        os.close(saved_out)
        os.close(saved_err)
