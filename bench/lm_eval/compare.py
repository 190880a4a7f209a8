"""Compare two lm-eval runs' per-request loglikelihoods (their `--log_samples` outputs): the largest difference,
and the documents whose acc, acc_norm or is_greedy differ. Exit 1 past `--tolerance`.

    python bench/lm_eval/compare.py REFERENCE_DIR OTHER_DIR [--tasks probe_mc,probe_roll] [--tolerance 1e-3]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any


def samples(directory: Path, task: str) -> dict[int, tuple[list[Any], Any, Any]]:
    files = sorted(directory.glob(f"*/samples_{task}_*.jsonl"))
    if not files:
        raise SystemExit(f"no samples of {task} under {directory}")
    rows = {}
    for line in files[-1].read_text().splitlines():
        doc = json.loads(line)
        values = []
        for response in doc["resps"]:
            value = response[0]
            values.append(ast.literal_eval(value) if isinstance(value, str) else value)
        rows[doc["doc_id"]] = (values, doc.get("acc"), doc.get("acc_norm"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--tasks", default="probe_mc,probe_roll")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    worst = 0.0
    for task in args.tasks.split(","):
        ref, other = samples(args.reference, task), samples(args.other, task)
        largest, requests, differing = 0.0, 0, 0
        for doc, (values, acc, acc_norm) in ref.items():
            theirs, their_acc, their_norm = other[doc]
            differing += (acc, acc_norm) != (their_acc, their_norm)
            for mine, yours in zip(values, theirs, strict=True):
                a, b = (mine[0], yours[0]) if isinstance(mine, list | tuple) else (mine, yours)
                differing += isinstance(mine, list | tuple) and mine[1] != yours[1]  # is_greedy
                largest = max(largest, abs(float(a) - float(b)))
                requests += 1
        print(f"{task}: {requests} requests, largest loglikelihood difference {largest:.2e}, {differing} differing")
        worst = max(worst, largest if not differing else float("inf"))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
