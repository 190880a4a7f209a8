"""How long /health waits while large prompts are tokenised: whether tokenising stalls the server's event loop.

Serves a model with `qwen-api serve` (by default the tiny Qwen2 on the native engine: the tokenizer is the real
Qwen2 one, the engine does not matter), sends `--bodies` concurrent `/tokenize` requests of about `--megabytes`
MB of text each (the body limit is 2 MB), and polls `GET /health` every 20 ms until they are answered: the
slowest and the median /health latency. `--pythonpath DIR` serves another source tree (e.g. a copy of `src`
before a change) in a second run, one after the other, for a side-by-side figure.

    .venv/bin/python -m qwen_api.dev.random_qwen2 /tmp/tiny --shape tiny
    .venv/bin/python bench/loop_stall.py --model /tmp/tiny
    .venv/bin/python bench/loop_stall.py --model /tmp/tiny --pythonpath /tmp/before/src
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
QWEN_API = Path(sys.executable).parent / "qwen-api"


def measure(model: str, engine: str, pythonpath: str, bodies: int, megabytes: float, port: int) -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = [
        str(QWEN_API),
        "serve",
        "--model",
        model,
        "--engine",
        engine,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not become healthy")
            time.sleep(0.5)
        text = "hello world, this is some text. " * int(megabytes * 1e6 / 32)
        done = threading.Event()

        def send() -> None:
            senders = [
                threading.Thread(target=lambda: httpx.post(f"{base}/tokenize", json={"prompt": text}, timeout=300))
                for _ in range(bodies)
            ]
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            done.set()

        start = time.monotonic()
        threading.Thread(target=send).start()
        waits: list[float] = []
        while not done.is_set():
            asked = time.monotonic()
            httpx.get(f"{base}/health", timeout=300)
            waits.append(time.monotonic() - asked)
            time.sleep(0.02)
        took = time.monotonic() - start
        return (
            f"{bodies} x {megabytes} MB /tokenize in {took:.2f} s; /health meanwhile: max {max(waits) * 1000:.0f} ms, "
            f"median {statistics.median(waits) * 1000:.0f} ms ({len(waits)} polls)"
        )
    finally:
        server.terminate()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", default="native")
    parser.add_argument("--bodies", type=int, default=4)
    parser.add_argument("--megabytes", type=float, default=1.9)
    parser.add_argument("--port", type=int, default=18777)
    parser.add_argument("--pythonpath", help="also serve this source tree, after this checkout's")
    args = parser.parse_args()
    trees = [("this checkout", str(ROOT / "src"))] + ([("--pythonpath", args.pythonpath)] if args.pythonpath else [])
    for name, tree in trees:
        print(f"{name}: {measure(args.model, args.engine, tree, args.bodies, args.megabytes, args.port)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
