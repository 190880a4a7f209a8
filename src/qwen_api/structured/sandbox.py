"""A grammar's first compile, in a child process that is killed when it takes too long.

llguidance compiles a grammar in native code that cannot be interrupted: a small schema can take minutes (a chain of
`allOf`s over `$ref`s doubles the work with each link), and a thread left running it after its time limit keeps a
core busy and its thread taken long after the request got its answer. So each grammar is first compiled here, in a
child process that has no tokenizer (the costly part, turning the grammar into its rules, does not need one): in
time, the caller builds the real matcher, at the same cost; too slow, the child is killed (and started again for the
next grammar), and the caller refuses the grammar at once. A child is a fresh interpreter running this module
(`python -m qwen_api.structured.sandbox FD`), never forked from a process with an engine's threads, nor started
through `multiprocessing`'s spawn, which re-imports the parent's main script in the child (a server started from
a script read on stdin had none to import, and its children died at once). It is started when a grammar first
needs one, and kept for the next grammars; it talks to its parent over a socket pair.
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import socket
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeAlias

START_TIMEOUT_S = 60.0


class Failure(enum.Enum):
    """Why the child gave no verdict on a grammar."""

    TOO_SLOW = "too slow"  # killed at the time limit
    CRASHED = "crashed"  # it died on the grammar (a native stack overflow on a very deep one)


def _serve(conn: Connection) -> None:
    """The child: for each grammar text received, (is_error, messages) from llguidance's own validation."""
    from llguidance import LLMatcher

    conn.send("ready")  # started and imported: the parent's time limits count from here
    while True:
        try:
            grammar = conn.recv()
        except EOFError:  # the parent closed its end or died
            return
        conn.send(LLMatcher.validate_grammar_with_warnings(grammar))


Child: TypeAlias = "tuple[subprocess.Popen[bytes], Connection]"


def _start() -> Child:
    """A child running `_serve`, and the parent's end of its connection."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    # the child imports this package as the parent did, installed or not
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "qwen_api.structured.sandbox", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        theirs.close()
    return process, Connection(ours.detach())


def _end(process: subprocess.Popen[bytes], conn: Connection) -> None:
    process.kill()  # an ended one is only reaped
    with contextlib.suppress(subprocess.TimeoutExpired):  # not reaped yet; it has had SIGKILL all the same
        process.wait(timeout=5)
    conn.close()


def _end_all(children: list[Child], lock: threading.Lock) -> None:
    with lock:
        ending = children[:]
        children.clear()
    for process, conn in ending:
        _end(process, conn)


class Sandbox:
    """Children that compile grammars; `check` blocks, for a worker thread. A child is started when no idle one is
    at hand and kept for the next grammar, unless it was killed: there are never more children than threads that
    call `check` at once. They are ended by `close`, or when the sandbox is collected or the interpreter exits."""

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue[Child] = queue.SimpleQueue()
        self._children: list[Child] = []  # every one not ended, to end them all on close
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _end_all, self._children, self._lock)

    def _take(self) -> Child:
        while True:
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                break
            if child[0].poll() is None:
                return child
        process, parent_end = _start()
        # A start is not a compile: it has its own, generous limit (an interpreter and llguidance to load).
        try:
            ready = parent_end.poll(START_TIMEOUT_S) and parent_end.recv() == "ready"
        except EOFError:  # it died starting
            ready = False
        if not ready:
            self._end(process, parent_end)
            raise RuntimeError(f"the grammar sandbox did not start within {START_TIMEOUT_S:.0f} s")
        with self._lock:
            self._children.append((process, parent_end))
        return process, parent_end

    def check(self, grammar: str, timeout: float) -> tuple[bool, list[str]] | Failure:
        """llguidance's (is_error, messages) for `grammar`; or why there is none: it took longer than `timeout`
        seconds (the child is then killed), or the child died on it."""
        process, conn = self._take()
        conn.send(grammar)
        failure = Failure.TOO_SLOW
        if conn.poll(timeout):
            try:
                is_error, messages = conn.recv()
            except EOFError:  # the child died on it (a crash in native code)
                failure = Failure.CRASHED
            else:
                self._idle.put((process, conn))
                return bool(is_error), [str(m) for m in messages]
        self._end(process, conn)
        return failure

    def _end(self, process: subprocess.Popen[bytes], conn: Connection) -> None:
        _end(process, conn)
        with self._lock:
            self._children[:] = [c for c in self._children if c[0] is not process]

    def close(self) -> None:
        self._finalizer()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
