"""`qwen_api_server(model, engine)`: `qwen-api serve` on a free loopback port for a benchmark, stopped on exit.

The benchmarks that measure one server against itself (with and without a feature) share this launcher; the
cross-server benchmark (serve_bench.py) has its own, which also launches peers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def qwen_api_server(model: str, engine: str, start_timeout: float = 300.0) -> Iterator[str]:
    """Yield the base URL of a healthy `qwen-api serve --model MODEL --engine ENGINE` (this venv's CLI)."""
    port = free_port()
    qwen_api = Path(sys.executable).with_name("qwen-api")
    env = {**os.environ, "QWEN_API_PORT": str(port), "QWEN_API_HOST": "127.0.0.1"}
    cmd = [str(qwen_api), "serve", "--model", model, "--engine", engine, "--log-level", "warning"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
