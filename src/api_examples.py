"""Example client for the Qwen2-7B-Instruct API: calls GET /health, then POST /generate, and prints the texts.

    python src/api_examples.py
    python src/api_examples.py --prompt "写一个递归函数来计算 Python 中的阶乘"
    python src/api_examples.py --max-length 256 --temperature 0.8 --top-p 0.95 --num-sequences 2
    python src/api_examples.py --url "http://your-server-address:2025"
    python src/api_examples.py --stream          # print the text as it is generated
    python src/api_examples.py --api-key KEY     # a server started with --api-key (default: $QWEN_API_API_KEY)

Exits 0 on success; on an unreachable server or an error answer it prints one line to stderr and exits 1.
Needs only `requests`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import requests

DEFAULT_PROMPT = "用 Python 编写一个计算斐波那契数列的函数"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Call the Qwen2-7B-Instruct API and print what it generates.")
    parser.add_argument("--url", default="http://localhost:2025", help="API base URL")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt to send")
    parser.add_argument("--max-length", type=int, default=512, help="most new tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=50, help="top-k sampling (0 disables it)")
    parser.add_argument("--num-sequences", type=int, default=1, help="number of texts to generate")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("QWEN_API_API_KEY") or None,  # the variable the server reads its --api-key from
        help="the server's --api-key, sent as a bearer token (default: $QWEN_API_API_KEY)",
    )
    return parser.parse_args(argv)


class ApiError(Exception):
    """The server could not be reached or answered with an error."""


def _describe_error(response: requests.Response) -> str:
    try:
        detail: Any = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # validation errors: one "field: message" per problem
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
    return f"HTTP {response.status_code}: {detail}"


def call(method: str, url: str, timeout: float, **kwargs: Any) -> dict[str, Any]:
    try:
        response = requests.request(method, url, timeout=timeout, **kwargs)
    except requests.RequestException as exc:
        raise ApiError(f"cannot reach {url}: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise ApiError(f"{method} {url} failed with {_describe_error(response)}")
    return response.json()


def stream(url: str, payload: dict[str, Any], timeout: float, headers: dict[str, str]) -> int:
    """POST with stream: true and print each text delta as its server-sent event arrives."""
    try:
        response = requests.post(url, json={**payload, "stream": True}, stream=True, timeout=timeout, headers=headers)
    except requests.RequestException as exc:
        raise ApiError(f"cannot reach {url}: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise ApiError(f"POST {url} failed with {_describe_error(response)}")
    current, event = None, None
    for raw in response.iter_lines(decode_unicode=True):
        line = raw if isinstance(raw, str) else raw.decode()
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            message = json.loads(data)
            if event == "error":
                raise ApiError(message.get("detail", data))
            if "text" in message:
                if message["index"] != current and payload["num_return_sequences"] > 1:
                    print(f"\n--- Sequence {message['index'] + 1} ---")
                current = message["index"]
                print(message["text"], end="", flush=True)
        else:
            event = None
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = args.url.rstrip("/")
    payload = {
        "prompt": args.prompt,
        "max_length": args.max_length,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "num_return_sequences": args.num_sequences,
    }
    try:
        health = call("GET", f"{base}/health", timeout=10)
        print(f"Server: {base} ({health.get('status')})")
        print(f"Prompt: {args.prompt}\n")
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        if args.stream:
            return stream(f"{base}/generate", payload, args.timeout, headers)
        result = call("POST", f"{base}/generate", timeout=args.timeout, json=payload, headers=headers)
    except ApiError as exc:
        print(f"\nerror: {exc}" if args.stream else f"error: {exc}", file=sys.stderr)
        return 1
    texts = result["generated_texts"]
    for i, text in enumerate(texts, 1):
        if len(texts) > 1:
            print(f"--- Sequence {i} of {len(texts)} ---")
        print(text.strip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
