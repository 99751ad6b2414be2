"""`tkernels inspect`: compile every registered kernel config for sm_80/sm_90 without a GPU and
report registers, spills, shared memory, occupancy and tensor-core / TMA / cp.async instructions
per build (fp32 dots in both input precisions, ieee and tf32).

Exit status: 0 when every build is fit to ship, 1 when one fails to compile, spills, needs more
shared memory than its target has, or (fp16/bf16/tf32 of a tensor-core kernel) has no HMMA/HGMMA;
2 for a bad request (unknown kernel, arch or dtype).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", action="append", metavar="ARCHS",
                        help="targets, comma-separated or repeated (default: sm_80,sm_90)")
    parser.add_argument("--kernel", action="extend", nargs="+", metavar="NAME",
                        help="registered kernel names or globs (default: all)")
    parser.add_argument("--dtype", action="extend", nargs="+", metavar="DTYPE",
                        help="fp16, bf16 and/or fp32 (default: each spec's dtypes)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="parallel compile processes (default: the number of CPUs)")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything, ignoring the result cache")
    parser.add_argument("--cache-dir", default=None,
                        help="result cache (default: $TKERNELS_CACHE_DIR/inspect or ~/.cache/tkernels/inspect)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on one build after this long (default: 600)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no compile after this long, except one build per kernel x arch; builds are "
                             "taken in an order that covers every kernel, config, variant and dtype early, and "
                             "those left out are not reported (cached results always are)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    from .. import inspection

    stats: dict = {}
    try:
        rows = inspection.inspect_kernels(
            kernels=args.kernel, archs=args.arch, dtypes=args.dtype, jobs=args.jobs,
            cache_dir=args.cache_dir, use_cache=not args.no_cache,
            timeout=args.timeout or inspection.DEFAULT_TIMEOUT_S,
            progress=None if args.quiet else sys.stderr, stats=stats, budget_s=args.budget)
    except inspection.InspectError as exc:
        print(f"tkernels inspect: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        if not args.quiet:
            print(summary(rows, stats), file=sys.stderr)
    else:
        print(format_table(rows))
        print()
        print(summary(rows, stats))
    return 0 if all(r["ok"] for r in rows) else 1


def format_table(rows: Sequence[dict]) -> str:
    """One aligned line per build (bytes for spill and smem), then the legend of variants."""
    head = ("kernel", "arch", "dtype", "config", "var", "regs", "spill", "smem", "ctas", "HMMA", "HGMMA", "TMA",
            "LDGSTS", "status")
    body = []
    for r in rows:
        status = "ok" if r["ok"] else "; ".join(r["problems"])
        if r["error"]:
            status += ": " + r["error"].strip().splitlines()[0][:100]
        nums = [r["registers"], r["spill_bytes"], r["shared_bytes"], r["ctas_per_sm"], r["hmma"], r["hgmma"],
                r["tma_ops"], r["async_copy_ops"]]
        dtype = r["dtype"] + (f"/{r['input_precision']}" if r["dtype"] == "fp32" and r["input_precision"] else "")
        body.append((r["kernel"], r["arch"], dtype, r["config"], f"v{r['variant_index']}",
                     *("-" if v is None else str(v) for v in nums), status))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head) - 1)]
    right = set(range(5, 13))
    lines = []
    for cells in [head, *body]:
        out = [(str(c).rjust(w) if i in right else str(c).ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))]
        lines.append("  ".join(out + [cells[-1]]).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    legend = {}
    for r in rows:
        legend.setdefault(r["kernel"], {})[r["variant_index"]] = r["variant"]
    lines.append("")
    lines.append("variants (non-tuning constexprs and example argument values):")
    for kernel, variants in legend.items():
        for vi, label in sorted(variants.items()):
            lines.append(f"  {kernel} v{vi}: {label}")
    return "\n".join(lines)


def summary(rows: Sequence[dict], stats: Optional[dict] = None) -> str:
    """One line: how many builds are fit to ship and what is wrong with the others."""
    n = len(rows)
    failed = sum(1 for r in rows if r["error"])
    spills = sum(1 for r in rows if not r["error"] and r["spill_bytes"])
    no_tc = sum(1 for r in rows if not r["error"] and r["tensor_cores_expected"] and not r["tensor_core_ops"])
    smem = sum(1 for r in rows if not r["error"] and not r["ctas_per_sm"])
    ok = sum(1 for r in rows if r["ok"])
    kernels = len({r["kernel"] for r in rows})
    text = (f"{n} builds of {kernels} kernels: {ok} ok, {failed} failed to compile, {spills} spill, "
            f"{no_tc} without tensor cores, {smem} never launch (too much shared memory)")
    if stats:
        text += (f". {stats['cached']} from the cache, {stats['compiled']} compiled on {stats['jobs']} "
                 f"worker(s) in {stats['wall_s']:.1f} s")
        if stats.get("left_out"):
            text += f"; {stats['left_out']} left out by the time budget"
    return text
