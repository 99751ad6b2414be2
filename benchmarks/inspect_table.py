"""Summarise `tkernels inspect --json` output as one Markdown row per (kernel, arch, operands).

    python3 -m tkernels inspect --arch sm_80,sm_90 --kernel "matmul*" "conv2d*" --json > rows.json
    python3 benchmarks/inspect_table.py rows.json [--kernel "conv2d*"]

"operands" is fp32 with its input precision (ieee or tf32), or "half" for fp16 and bf16 together.
The last line totals every row read: builds, spills, builds over shared memory, failures.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

COLUMNS = ("kernel", "arch", "operands", "builds", "max regs", "max spill B", "max smem B", "min CTAs/SM",
           "w/ tensor cores", "w/ TMA", "w/ LDGSTS", "not ok")


def operands(row: dict) -> str:
    if row["dtype"] in ("fp16", "bf16"):
        return "half"
    return f"{row['dtype']}/{row['input_precision']}" if row.get("input_precision") else row["dtype"]


def summarise(rows: List[dict]) -> List[Tuple]:
    groups: Dict[Tuple[str, str, str], List[dict]] = defaultdict(list)
    for row in rows:
        groups[row["kernel"], row["arch"], operands(row)].append(row)
    table = []
    for key in sorted(groups):
        built = [r for r in groups[key] if r.get("error") is None]
        table.append((*key, len(groups[key]),
                      max((r["registers"] for r in built), default="-"),
                      max((r["spill_bytes"] for r in built), default="-"),
                      max((r["shared_bytes"] for r in built), default="-"),
                      min((r["ctas_per_sm"] for r in built), default="-"),
                      sum(r["tensor_core_ops"] > 0 for r in built),
                      sum(r["tma_ops"] > 0 for r in built),
                      sum(r["async_copy_ops"] > 0 for r in built),
                      sum(not r["ok"] for r in groups[key])))
    return table


def totals(rows: List[dict]) -> str:
    spills = sum(r.get("spill_bytes", 0) > 0 for r in rows if r.get("error") is None)
    over = sum(any(p.startswith("never launches") for p in r.get("problems", [])) for r in rows)
    failed = sum(r.get("error") is not None for r in rows)
    tma = sum(r.get("tma_ops", 0) > 0 for r in rows)
    ldgsts = sum(r.get("async_copy_ops", 0) > 0 for r in rows)
    kernels = len({r["kernel"] for r in rows})
    regs = max((r["registers"] for r in rows if r.get("error") is None), default=0)
    return (f"{len(rows)} builds of {kernels} kernels: {spills} spill, {over} over shared memory, "
            f"{failed} failed; {tma} use TMA, {ldgsts} use LDGSTS; max {regs} registers")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="output of tkernels inspect --json ('-' for stdin)")
    parser.add_argument("--kernel", nargs="*", default=["*"], help="kernel name globs (default: all)")
    args = parser.parse_args(argv)
    rows = json.load(sys.stdin if args.json == "-" else open(args.json))
    rows = [r for r in rows if any(fnmatch.fnmatch(r["kernel"], k) for k in args.kernel)]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for line in summarise(rows):
        print("| " + " | ".join(str(v) for v in line) + " |")
    print()
    print(totals(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
