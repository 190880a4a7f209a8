"""The native engine against our transformers engine and `transformers serve`, on one model, start to end.

Builds a random-weight Qwen2 model directory (7B-shaped bf16, initialised on the GPU itself: built on the CPU it
took 313 s), then for each server in turn: launches it on that directory, waits until it answers, runs streaming
chat at each concurrency level (`bench/serve_bench.py`'s client: temperature 0.7, N new tokens), then time to
first token at one concurrency with long prompts (each prompt distinct from its first words on, so no prefix
cache can help), and stops it. Servers run one at a time: three 15 GB models and the native engine's KV cache
(most of the free memory) would not share one GPU. A time budget skips the servers it could not finish,
saying so, so the whole run stays within the device machine's limits.

    python bench/native_gpu.py --shape 7b        # on a GPU machine (see README, "On a GPU: the native engine")
    .venv/bin/python bench/native_gpu.py --shape tiny   # on the CPU: the same path, small numbers
    python bench/native_gpu.py --shape 7b --servers qwen-api-native,qwen-api-native+prefill-delay=2   # flags: +k=v

It prints one table and writes the raw figures to OUT_DIR/native_gpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import Launched, Level, run_level, table

SHAPES: dict[str, dict] = {
    "7b": {
        "device": "cuda",
        "dtype": "bfloat16",
        "levels": {1: 4, 16: 32, 64: 64},  # concurrency -> requests
        "max_tokens": 128,
        "ttft": {"concurrency": 16, "requests": 32, "prompt_tokens": 1000},
        "qwen_api_args": ["--device", "cuda", "--max-batch-size", "64", "--max-new-tokens-limit", "2048"],
    },
    "tiny": {
        "device": "cpu",
        "dtype": "float32",
        "levels": {1: 2, 4: 8},
        "max_tokens": 16,
        "ttft": {"concurrency": 4, "requests": 4, "prompt_tokens": 200},
        "qwen_api_args": ["--device", "cpu", "--dtype", "float32", "--max-batch-size", "8"],
    },
}
SERVERS = ["qwen-api-native", "qwen-api-native+prefill-delay=2", "qwen-api-transformers", "transformers-serve"]
FILLER = "The river runs past the old mill, where children watch the boats and count the passing birds. "


def long_prompts(tokens: int, count: int) -> list[str]:
    """`count` prompts of about `tokens` tokens (about 20 tokens a filler sentence), distinct from the start."""
    body = FILLER * max(1, tokens // 20)
    return [f"Request {i}: summarise this text in one line. {body}" for i in range(count)]


def build_model(model_dir: Path, shape: str, device: str, dtype: str) -> float:
    """Seconds it took; 0 when the directory already holds a model."""
    if (model_dir / "config.json").is_file():
        return 0.0
    import torch

    from qwen_api.dev.random_qwen2 import write_random_qwen2

    start = time.perf_counter()
    write_random_qwen2(model_dir, shape=shape, dtype=getattr(torch, dtype), device=device)
    return time.perf_counter() - start


def sample_stacks(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """py-spy (when installed) records the server's Python stacks for `seconds`, as collapsed stacks in `out`."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not found: no stack samples", file=sys.stderr)
        return None
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250", "--format", "raw",
           "--threads", "--nonblocking", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def bench_server(name: str, shape: dict, model_dir: Path, out: Path, py_spy: bool = False) -> dict:
    """`name` is a server kind, optionally with flags: `qwen-api-native+prefill-delay=2` adds `--prefill-delay 2`."""
    kind, *options = name.split("+")
    extra = shape["qwen_api_args"] if kind.startswith("qwen-api") else []
    extra = [
        *extra,
        *(part for option in options for part in (f"--{option.partition('=')[0]}", option.partition("=")[2])),
    ]
    started = time.perf_counter()
    server = Launched(kind, extra, out, str(model_dir), name=name)
    try:
        server.wait_ready(timeout=300)
        ready_s = time.perf_counter() - started
        print(f"{name}: ready in {ready_s:.1f} s", file=sys.stderr)
        asyncio.run(run_level(name, server.url, 1, 2, 4))  # warm-up, not measured
        levels = []
        for c, n in shape["levels"].items():
            # the stacks of the busiest level: where the server's own CPU time goes while it serves most streams
            spy = (
                sample_stacks(server.proc.pid, 6, out / f"py-spy-{name}.txt")
                if py_spy and c == max(shape["levels"])
                else None
            )
            levels.append(asyncio.run(run_level(name, server.url, c, n, shape["max_tokens"])))
            if spy is not None:
                spy.wait(timeout=30)
        t = shape["ttft"]
        prompts = long_prompts(t["prompt_tokens"], t["requests"])
        ttft = asyncio.run(run_level(name, server.url, t["concurrency"], t["requests"], 8, prompts))
    finally:
        server.stop()
    return {"kind": name, "ready_s": ready_s, "levels": levels, "ttft": ttft}


def report(results: list[dict], shape: dict, skipped: list[str]) -> str:
    lines = [table([lv for r in results for lv in r["levels"]]), ""]
    t = shape["ttft"]
    lines.append(
        f"time to first token, {t['concurrency']} concurrent, ~{t['prompt_tokens']}-token prompts (8 new tokens):"
    )
    for r in results:
        s = r["ttft"].summary()
        lines.append(
            f"  {r['kind']:<24} p50 {s['ttft_p50_s'] * 1000:8.1f} ms   p99 {s['ttft_p99_s'] * 1000:8.1f} ms   "
            f"errors {r['ttft'].errors}   (server ready after {r['ready_s']:.1f} s)"
        )
    if skipped:
        lines.append(f"skipped (time budget): {', '.join(skipped)}")
    return "\n".join(lines)


def _level_json(level: Level) -> dict:
    return {**asdict(level), "summary": level.summary()}


def write_json(out: Path, shape: str, build_s: float, total_s: float, skipped: list[str], results: list[dict]) -> float:
    """The raw figures so far in OUT/native_gpu.json; returns `total_s`."""
    raw = {
        "shape": shape,
        "build_s": build_s,
        "total_s": total_s,
        "skipped": skipped,
        "servers": [
            {
                "kind": r["kind"],
                "ready_s": r["ready_s"],
                "levels": [_level_json(lv) for lv in r["levels"]],
                "ttft": _level_json(r["ttft"]),
            }
            for r in results
        ],
    }
    (out / "native_gpu.json").write_text(json.dumps(raw, indent=2))
    return total_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--model-dir", type=Path, help="default: OUT_DIR/qwen2-SHAPE (built when missing)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-results/native-gpu"))
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, in the order run")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no server past this many seconds")
    parser.add_argument("--py-spy", action="store_true", help="sample the qwen-api servers' stacks at the top level")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    shape = SHAPES[args.shape]
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or out / f"qwen2-{args.shape}"
    build_s = build_model(model_dir, args.shape, shape["device"], shape["dtype"])
    print(f"model {model_dir}: built in {build_s:.1f} s (0: reused)", file=sys.stderr)
    results: list[dict] = []
    skipped: list[str] = []
    for kind in args.servers.split(","):
        if time.perf_counter() - start > args.budget_s:
            skipped.append(kind)
            continue
        results.append(bench_server(kind, shape, model_dir, out, args.py_spy and kind.startswith("qwen-api")))
        # after each server, so that a run stopped from outside (the device machine's time limit) keeps what finished
        write_json(out, args.shape, build_s, time.perf_counter() - start, skipped, results)
        print(report(results[-1:], shape, []), file=sys.stderr)
    print(report(results, shape, skipped))
    total_s = write_json(out, args.shape, build_s, time.perf_counter() - start, skipped, results)
    print(f"\ntotal {total_s:.0f} s; raw figures: {out / 'native_gpu.json'}")
    return 1 if any(lv.errors for r in results for lv in [*r["levels"], r["ttft"]]) else 0


if __name__ == "__main__":
    sys.exit(main())
