"""`tkernels inspect`: registered kernel configs compile for sm_80 and sm_90 with Triton's AOT
compiler, without spills, and the fp16/bf16 builds of tensor-core kernels contain HMMA/HGMMA.

Compiling every build (config x variant x dtype (fp32 in both input precisions) x arch of every
spec: 1300+ once all families registered, about 2-10 CPU-seconds each) does not fit this file's 5-minute budget on 2 cores. So the
test compiles in ``coverage_order`` for ``TKERNELS_INSPECT_BUDGET_S`` seconds (default 150):
always one build per kernel x arch (its costliest config, in bf16), every fp16/bf16 matmul build and
the first fp16/bf16 build of each sm_90 TMA matmul kernel, then as many other configs, variants and dtypes as fit. Results are cached on disk keyed by the
kernel source, and every cached build is checked too, so repeated runs (or a prior full
`tkernels inspect`, the CI main job) extend the check to everything. TKERNELS_INSPECT_BUDGET_S=none
compiles everything. Compiles run on worker subprocesses without TRITON_INTERPRET, one per CPU.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest

from tkernels import inspection
from tkernels.inspection import workers as inspection_workers  # noqa: F401 (patched below)
from tkernels.cli import main
from tkernels.ops._common import KERNEL_SPECS
from tkernels.ops.matmul_tma import HAS_TENSOR_DESCRIPTORS

_BUDGET = os.environ.get("TKERNELS_INSPECT_BUDGET_S", "150")
BUDGET_S = None if _BUDGET.lower() in ("none", "full", "") else float(_BUDGET)


def _describe(rows):
    return "\n".join(f"  {r['kernel']} {r['arch']} {r['dtype']} config {r['config_index']} [{r['config']}] "
                     f"variant {r['variant_index']}: {'; '.join(r['problems'])}"
                     + (f"\n    {r['error'][:400]}" if r["error"] else "") for r in rows)


def _expected_builds(spec, arch):
    if arch not in spec.configs_by_arch:
        return 0
    return sum(len(spec.configs(arch, d, p)) * len(spec.variants)
               for d in spec.dtypes for p in inspection.precisions(spec, d))


def _is_tensor_core_matmul(build):
    """Always compiled: every fp16/bf16 build of the cp.async matmul (forward and gated tiles), and the
    first build of each TMA matmul kernel in both half dtypes."""
    if build.kernel in ("matmul", "matmul_gated"):
        return build.dtype in ("fp16", "bf16")
    return build.kernel.startswith("matmul_tma") and build.config_index == 0 and build.variant_index == 0


@pytest.mark.slow
def test_registered_configs_compile_for_both_archs():
    stats = {}
    rows = inspection.inspect_kernels(archs=["sm_80", "sm_90"], budget_s=BUDGET_S, always=_is_tensor_core_matmul,
                                      stats=stats)
    total = sum(_expected_builds(spec, arch) for spec in KERNEL_SPECS.values() for arch in ("sm_80", "sm_90"))
    assert stats["builds"] == total and len(rows) + stats["left_out"] == total
    assert len({(r["kernel"], r["arch"], r["dtype"], r["input_precision"], r["config_index"], r["variant_index"])
                for r in rows}) == len(rows)
    if stats["left_out"]:
        warnings.warn(f"tkernels inspect test: checked {len(rows)} of {total} builds within its {BUDGET_S:.0f} s "
                      f"budget ({stats['cached']} from the cache); `tkernels inspect` checks them all")

    # always checked: every kernel on both archs, and every fp16/bf16 matmul build
    assert {(r["kernel"], r["arch"]) for r in rows} == {(n, a) for n, spec in KERNEL_SPECS.items()
                                                        for a in ("sm_80", "sm_90") if a in spec.configs_by_arch}
    for name in ("matmul", "matmul_gated"):
        matmul = KERNEL_SPECS[name]
        tc_matmul = [r for r in rows if r["kernel"] == name and r["dtype"] in ("fp16", "bf16")]
        assert len(tc_matmul) == sum(len(matmul.configs_by_arch[a]) * len(matmul.variants) * 2
                                     for a in ("sm_80", "sm_90"))

    failures = [
        ("do not compile", [r for r in rows if r["error"]]),
        ("spill registers", [r for r in rows if not r["error"] and r["spill_bytes"]]),
        ("need more shared memory than their arch has", [r for r in rows if not r["error"] and not r["ctas_per_sm"]]),
        ("are fp16/bf16/tf32 builds of tensor-core kernels without HMMA/HGMMA",
         [r for r in rows if not r["error"] and r["tensor_cores_expected"] and not r["tensor_core_ops"]]),
    ]
    report = "\n".join(f"{len(bad)} builds {what}:\n{_describe(bad)}" for what, bad in failures if bad)
    if report:
        pytest.fail(report, pytrace=False)
    assert all(r["ok"] for r in rows)

    # the measurements are real: registers in range, wgmma only where it exists
    assert all(1 <= r["registers"] <= 255 for r in rows)
    assert all(r["hgmma"] == 0 for r in rows if r["arch"] == "sm_80")
    assert all(r["tensor_core_ops"] > 0 for r in tc_matmul)
    for dtype in ("fp16", "bf16"):
        assert any(r["hgmma"] > 0 for r in tc_matmul if r["arch"] == "sm_90" and r["dtype"] == dtype), \
            f"no {dtype} matmul config uses wgmma on sm_90"
    # the sm_90 TMA matmul: copy-engine loads (UTMALDG) feeding wgmma, in both half dtypes
    tma = [r for r in rows if r["kernel"].startswith("matmul_tma")]
    assert tma and all(r["arch"] == "sm_90" and r["tma_ops"] > 0 and r["hgmma"] > 0 for r in tma)
    assert {r["dtype"] for r in tma} == {"fp16", "bf16"}
    # the sm_90 FAST conv builds with a TMA operand tile (forward and input-gradient weights,
    # weight-gradient dz): copy-engine loads in every one
    conv_tma = [r for r in rows if r["kernel"].startswith("conv2d") and r["kernel"].endswith("_tma")]
    assert {r["kernel"] for r in conv_tma} == ({"conv2d_fwd_fast_tma", "conv2d_dgrad_fast_tma", "conv2d_wgrad_fast_tma"}
                                               if HAS_TENSOR_DESCRIPTORS else set())
    assert all(r["arch"] == "sm_90" and r["tma_ops"] > 0 for r in conv_tma), _describe(conv_tma)
    # every sm_90 fp16/bf16 conv build moves operands asynchronously (cp.async or TMA) in its main
    # loop, except conv2d_grad_z's gathered tiling (any strides: no aligned runs to copy)
    sync_conv = [r for r in rows if r["kernel"].startswith("conv2d") and r["arch"] == "sm_90"
                 and r["dtype"] in ("fp16", "bf16") and not (r["async_copy_ops"] or r["tma_ops"])
                 and not (r["kernel"] == "conv2d_grad_z" and "FAST=False PLANES=False" in r["variant"])]
    assert not sync_conv, f"sm_90 half conv builds without async copies:\n{_describe(sync_conv)}"
    plain = [r for r in rows if r["kernel"] == "sum_partials"]
    assert plain and all(r["tensor_core_ops"] == 0 for r in plain)


def test_coverage_order_covers_every_axis_early():
    specs = KERNEL_SPECS
    builds = inspection.plan(specs, sorted(specs), ["sm_80", "sm_90"])
    order = inspection.coverage_order(specs, builds)
    assert sorted(map(repr, (b for _, b in order))) == sorted(map(repr, builds))  # each build once
    tiers = [t for t, _ in order]
    assert tiers == sorted(tiers)
    groups = {(b.kernel, b.arch) for b in builds}
    tier0 = [b for t, b in order if t == 0]
    assert sorted((b.kernel, b.arch) for b in tier0) == sorted(groups)
    for b in tier0:
        spec = specs[b.kernel]
        assert b.dtype == ("bf16" if "bf16" in spec.dtypes else spec.dtypes[0]) and b.variant_index == 0
    upto = lambda tier: [b for t, b in order if t <= tier]  # noqa: E731
    for (kernel, arch) in groups:
        spec = specs[kernel]
        flavours = {(d, p) for d in spec.dtypes for p in inspection.precisions(spec, d)}
        first = [b for b in upto(1) if (b.kernel, b.arch) == (kernel, arch)]
        for dtype, precision in flavours:  # every config of every config list, early
            configs = spec.configs(arch, dtype, precision)
            labels = lambda f: list(map(inspection.config_label, spec.configs(arch, *f)))  # noqa: E731
            sharing = [f for f in flavours if labels(f) == labels((dtype, precision))]
            assert {b.config_index for b in first if (b.dtype, b.precision) in sharing} == set(range(len(configs)))
        if spec.tensor_cores:
            for dt in (d for d in ("fp16", "bf16") if d in spec.dtypes):
                assert {b.config_index for b in first if b.dtype == dt} == set(range(len(spec.configs_by_arch[arch])))
        second = [b for b in upto(2) if (b.kernel, b.arch) == (kernel, arch)]
        assert {b.variant_index for b in second} == set(range(len(spec.variants)))
        assert {(b.dtype, b.precision) for b in second} == flavours


def test_fp32_dots_are_built_in_both_input_precisions():
    specs = KERNEL_SPECS
    builds = inspection.plan(specs, ["matmul", "conv2d_fwd_fp32", "sum_partials"], ["sm_90"])
    flavours = lambda name: {(b.dtype, b.precision) for b in builds if b.kernel == name}  # noqa: E731
    assert flavours("matmul") == {("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")}
    assert flavours("conv2d_fwd_fp32") == {("fp32", "ieee"), ("fp32", "tf32")}
    assert flavours("sum_partials") == {("fp16", ""), ("bf16", ""), ("fp32", "")}
    # exact fp32 has its own tiles, and compiles with INPUT_PRECISION set from the build
    matmul = specs["matmul"]
    exact = [b for b in builds if b.kernel == "matmul" and b.precision == "ieee" and b.dtype == "fp32"]
    assert len(exact) == len(matmul.configs("sm_90", "fp32", "ieee")) * len(matmul.variants)
    assert all(c.kwargs["BLOCK_K"] <= 32 for c in matmul.configs("sm_90", "fp32", "ieee"))
    row = inspection.make_row(matmul, exact[0], dict(registers=100, spill_bytes=0, shared_bytes=1024,
                                                     static_shared_bytes=0, hmma=0, hgmma=0, tensor_core_ops=0,
                                                     tma_ops=0, async_copy_ops=4, error=None))
    assert row["input_precision"] == "ieee" and row["values"]["INPUT_PRECISION"] == "ieee"
    assert row["ok"] and not row["tensor_cores_expected"]  # exact fp32 runs on the FMA units
    tf32 = inspection.Build("matmul", "sm_90", "fp32", 0, 0, "tf32")
    assert inspection.make_row(matmul, tf32, dict(row, tensor_core_ops=0))["problems"] == \
        ["no tensor-core ops (HMMA/HGMMA)"]


def test_sass_opcode_counts():
    sass = """
        /*0050*/                   LDGSTS.E.BYPASS.LTC128B.128 [R1+0x100], desc[UR4][R2.64] ;
        /*0060*/              @!P0 HMMA.16816.F32 R4, R8, R10, R4 ;
        /*0070*/              @UP0 UTMALDG.2D [UR8], [UR4] ;
        /*0080*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
        /*0090*/                   UTMASTG.2D [UR4], [UR8] ;
        /*00a0*/                   UBLKCP.S.G [UR4], [UR6], UR8 ;
        /*00b0*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
    """
    assert inspection.count_opcodes(sass) == dict(hmma=1, hgmma=1, tensor_core_ops=2, tma_ops=3, async_copy_ops=1)


def test_ctas_per_sm_from_registers_and_shared_memory():
    # 128 registers x 256 threads = 32 Ki registers: 2 blocks by registers
    assert inspection.ctas_per_sm("sm_90", 128, 0, 8) == 2
    # 240 registers x 256 threads: one block; the same with 128 threads: 2
    assert inspection.ctas_per_sm("sm_90", 240, 0, 8) == 1 and inspection.ctas_per_sm("sm_90", 240, 0, 4) == 2
    # shared memory: 100 KiB (+1 KiB reserved) per block, 228 KiB per SM on sm_90, 164 KiB on sm_80
    assert inspection.ctas_per_sm("sm_90", 32, 100 * 1024, 4) == 2
    assert inspection.ctas_per_sm("sm_80", 32, 100 * 1024, 4) == 1
    # more than a block may have: it never launches
    assert inspection.ctas_per_sm("sm_90", 32, 246784, 4) == 0
    # small kernels are capped by threads (2048) and block slots (32)
    assert inspection.ctas_per_sm("sm_80", 16, 0, 1) == 32 and inspection.ctas_per_sm("sm_80", 16, 0, 4) == 16


@pytest.mark.slow
def test_budget_keeps_one_build_per_kernel_and_arch(tmp_path):
    stats = {}
    rows = inspection.inspect_kernels(kernels=["sum_partials"], archs=["sm_80"], budget_s=0, cache_dir=tmp_path,
                                      jobs=1, stats=stats)
    assert [(r["kernel"], r["arch"], r["dtype"]) for r in rows] == [("sum_partials", "sm_80", "bf16")]
    assert stats["left_out"] == len(KERNEL_SPECS["sum_partials"].dtypes) - 1 and rows[0]["ok"]


@pytest.mark.slow
def test_json_schema_filtering_and_cache(capsys, tmp_path):
    argv = ["inspect", "--json", "--kernel", "sum_part*", "--arch", "sm_80,sm_90", "--dtype", "fp32", "bf16",
            "--cache-dir", str(tmp_path), "--jobs", "1", "--quiet"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)

    spec = KERNEL_SPECS["sum_partials"]
    assert {r["kernel"] for r in first} == {"sum_partials"}
    assert sorted((r["arch"], r["dtype"]) for r in first) == sorted(
        (a, d) for a in ("sm_80", "sm_90") for d in ("fp32", "bf16") for _ in spec.variants
        for _ in spec.configs_by_arch[a])
    for r in first:
        assert set(inspection.ROW_KEYS) <= set(r)
        assert r["arch"] in ("sm_80", "sm_90") and isinstance(r["config"], str) and r["config"]
        for key in ("registers", "spill_bytes", "shared_bytes", "tensor_core_ops", "hmma", "hgmma", "tma_ops",
                    "async_copy_ops", "ctas_per_sm"):
            assert isinstance(r[key], int) and r[key] >= 0, (key, r[key])
        assert r["ctas_per_sm"] >= 1 and r["input_precision"] is None
        assert r["ok"] is True and r["error"] is None and r["problems"] == [] and r["cached"] is False
        assert r["num_warps"] == spec.configs_by_arch[r["arch"]][r["config_index"]].num_warps

    # the second run is answered from the cache, with the same numbers
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(r["cached"] for r in second)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cached"} for r in rows]  # noqa: E731
    assert strip(second) == strip(first)
    assert len(list(tmp_path.rglob("*.json"))) == len(first)


@pytest.mark.parametrize("argv, expected", [
    (["--kernel", "no_such_kernel"], ["no_such_kernel", "matmul"]),
    (["--kernel", "matmul", "--arch", "sm_75"], ["sm_75", "sm_80", "sm_90"]),
    (["--kernel", "matmul", "--arch", "sm_80,hopper"], ["hopper"]),
    (["--kernel", "matmul", "--dtype", "fp64"], ["fp64", "fp16", "bf16", "fp32"]),
    (["--kernel", "matmul", "--jobs", "0"], ["--jobs", "0"]),
])
def test_bad_request_is_a_clear_error_before_any_compile(capsys, argv, expected, monkeypatch):
    def no_worker(*args, **kwargs):
        raise AssertionError("a bad request must be refused before any compile worker starts")
    monkeypatch.setattr(inspection.workers, "Worker", no_worker)
    assert main(["inspect", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "tkernels inspect: error:" in captured.err
    for word in expected:
        assert word in captured.err


def test_arch_and_dtype_parsing():
    assert inspection.parse_archs(None) == ["sm_80", "sm_90"]
    assert inspection.parse_archs(["sm_90,sm_80", "sm_90"]) == ["sm_90", "sm_80"]
    assert inspection.parse_archs(["80", "sm90"]) == ["sm_80", "sm_90"]
    assert inspection.parse_dtypes(["bfloat16,fp16"]) == ["bf16", "fp16"]
    assert inspection.parse_dtypes(None) is None


def _row(**metrics):
    spec = KERNEL_SPECS["matmul"]
    base = dict(registers=128, spill_bytes=0, shared_bytes=16384, static_shared_bytes=0, hmma=32, hgmma=0,
                tensor_core_ops=32, tma_ops=0, async_copy_ops=12, error=None, compile_s=1.0)
    base.update(metrics)
    return inspection.make_row(spec, inspection.Build("matmul", "sm_80", "fp16", 0, 0, "ieee"), base)


def test_shared_memory_over_the_limit_fails_the_run(capsys, monkeypatch):
    row = _row(shared_bytes=200 * 1024)  # sm_80 blocks have 163 KiB at most
    assert not row["ok"] and row["ctas_per_sm"] == 0 and "never launches" in row["problems"][0]
    monkeypatch.setattr(inspection, "inspect_kernels", lambda **kwargs: [row])
    assert main(["inspect", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "never launches" in out and "1 never launch" in out


@pytest.mark.parametrize("metrics, problem", [
    ({}, None),
    ({"spill_bytes": 8}, "spills"),
    ({"hmma": 0, "tensor_core_ops": 0}, "no tensor-core ops"),
    ({"error": "CompilationError: at 12:4: boom"}, "compile failed"),
])
def test_each_problem_fails_the_run_and_shows_in_the_table(capsys, monkeypatch, metrics, problem):
    row = _row(**metrics)
    monkeypatch.setattr(inspection, "inspect_kernels", lambda **kwargs: [row])
    code = main(["inspect", "--quiet"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["kernel", "arch", "dtype", "config", "var"]
    assert any(line.startswith("matmul") and "sm_80" in line and "fp16" in line for line in lines)
    assert "1 builds of 1 kernels" in out
    if problem is None:
        assert code == 0 and row["ok"] and " ok" in lines[2]
    else:
        assert code == 1 and not row["ok"] and problem in lines[2]
