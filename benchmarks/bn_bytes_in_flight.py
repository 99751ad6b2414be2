"""Estimated bytes in flight per SM of every batch-norm build, from `tkernels inspect --json` output.

    python3 -m tkernels inspect --arch sm_80,sm_90 --kernel "batch_norm*" --json -j 2 > bn.json
    python3 benchmarks/bn_bytes_in_flight.py bn.json [--before old.json] [--sms 132]

Little's law: an H200 streams ~4.8 TB/s with a loaded memory latency of ~0.6-0.8 us, so
4.8e12 B/s x 0.7e-6 s = 3.4 MB must be in flight, ~25-30 KB per SM (132 SMs); 80% of the measured
copy bandwidth (~4.3 TB/s) needs ~18-21 KB per SM. The estimate per build is

    resident CTAs x tiles in flight per CTA x tensors read x BLOCK_C x BLOCK_S x element size

* resident CTAs: min(ctas_per_sm from inspect, programs the launcher puts on each SM); the
  elementwise kernels launch one program per tile (far more than fit), the reductions
  `programs_per_sm` below (a large input: ResNet-50's 256x256x56x56); the single-launch kernel,
  taken for small inputs only, is given per program (one CTA);
* tiles in flight per CTA: 1 for the elementwise kernels and for a reduction loop that loads one
  tile and then uses it; a reduction that loads a pair of work items before using either has 2;
  a software-pipelined one (cp.async, `async_copy_ops` > 0) has 2 x (STAGES - 1) issued ahead.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
TENSORS_READ = {"stats_partial": 1, "train_single": 1, "backward_partial": 2, "apply": 1, "backward_input": 2}
REDUCTIONS = ("stats_partial", "train_single", "backward_partial")


def programs_per_sm(kind: str, meta: dict, channels_last: bool, new: bool) -> float:
    """Programs per SM the launcher starts for a large input (the split count G times the channel
    blocks, over the SMs): the grid aims at `per_sm` programs for the reference channel block `ref_c`,
    so a config with BLOCK_C gets per_sm * ref_c / BLOCK_C. (Old: 4 per SM at the _G_HINT tile;
    new: PROGRAMS_PER_SM = 8 at the widest tuned tile.) The single-launch kernel (small inputs only,
    one program per channel block) is counted per program: one resident CTA."""
    if kind not in REDUCTIONS:
        return float("inf")
    per_sm, ref_c = (8, 128 if channels_last else 16) if new else (4, 64 if channels_last else 4)
    return per_sm * ref_c / meta["BLOCK_C"]


def tiles_in_flight(kind: str, row: dict) -> int:
    if kind not in REDUCTIONS:
        return 1
    stages = row["meta"].get("STAGES")
    if stages is None:  # the old one-tile loop
        return 1
    return 2 * (stages - 1) if row.get("async_copy_ops") and stages > 1 else 2


def estimate(row: dict, new: bool) -> dict:
    name = row["kernel"][len("batch_norm_"):]
    channels_last = name.endswith("_channels_last")
    kind = name[: -len("_channels_last")] if channels_last else name
    meta = row["meta"]
    if kind not in TENSORS_READ or row.get("ctas_per_sm") is None:
        return {}
    resident = 1 if kind == "train_single" else min(row["ctas_per_sm"], programs_per_sm(kind, meta, channels_last, new))
    tile = meta["BLOCK_C"] * meta["BLOCK_S"] * ELEMENT_BYTES[row["dtype"]]
    per_cta = tiles_in_flight(kind, row) * TENSORS_READ[kind] * tile
    return {"kind": kind, "layout": "channels_last" if channels_last else "NCHW", "resident": resident,
            "kb_per_sm": resident * per_cta / 1024}


def summarise(rows, new: bool):
    """Per (kernel, layout, arch): registers, spills, CTAs/SM, shared, LDGSTS builds and the in-flight
    estimate, as min-max over its configs and dtypes (the heaviest variant of each build)."""
    groups = defaultdict(list)
    for r in rows:
        e = estimate(r, new)
        if e:
            groups[(e["kind"], e["layout"], r["arch"])].append((r, e))
    out = {}
    for key, items in groups.items():
        def span(values):
            values = [v for v in values if v is not None]
            lo, hi = min(values), max(values)
            return f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}"
        best = {}
        for r, e in items:
            best[r["dtype"]] = max(best.get(r["dtype"], 0), e["kb_per_sm"])
        out[key] = {
            "builds": len(items), "registers": span(r["registers"] for r, _ in items),
            "spills": max(r["spill_bytes"] or 0 for r, _ in items), "ctas": span(r["ctas_per_sm"] for r, _ in items),
            "shared": span(r["shared_bytes"] for r, _ in items),
            "ldgsts": sum(1 for r, _ in items if r.get("async_copy_ops")),
            "kb": span(e["kb_per_sm"] for _, e in items),
            "best": " / ".join(f"{best[d]:.0f}" for d in ("fp16", "bf16", "fp32") if d in best),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("after", help="inspect --json output of the current kernels")
    ap.add_argument("--before", help="inspect --json output of the old kernels (one-tile loops, old grid)")
    args = ap.parse_args()
    tables = [("after", summarise(json.load(open(args.after)), new=True))]
    if args.before:
        tables.insert(0, ("before", summarise(json.load(open(args.before)), new=False)))
    print("| kernel | layout | arch | when | builds | registers | spills | CTAs/SM | shared B | LDGSTS builds "
          "| KB in flight/SM (all configs) | best config fp16 / bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted(set().union(*[t.keys() for _, t in tables]))
    for key in keys:
        for when, t in tables:
            if key in t:
                s = t[key]
                print(f"| {key[0]} | {key[1]} | {key[2]} | {when} | {s['builds']} | {s['registers']} | {s['spills']} "
                      f"| {s['ctas']} | {s['shared']} | {s['ldgsts']} | {s['kb']} | {s['best']} |")


if __name__ == "__main__":
    main()
