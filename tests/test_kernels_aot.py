"""Ahead-of-time compilation of every LoRA kernel for sm_80 and sm_90 (no GPU needed):
they compile, the GEMMs use the architecture's tensor-core MMA, nothing spills.

The training kernels compile in bf16 and fp16; the grouped and serving kernels share their
building blocks and are compiled in bf16 only (the fp16 variants differ in nothing that moves
registers), which keeps this file near a minute on 2 cores."""

from __future__ import annotations

import json

import pytest

aot = pytest.importorskip("lora_triton.kernels.aot_report")

ARCHS = ("sm_80", "sm_90")
TRAINING = ("shrink", "fwd_gemm", "dudb", "da", "dx")
# grouped + multi-adapter serving; DoRA's kernels are checked in test_dora_aot.py
EXTRA = tuple(k for k in aot.KERNELS if k not in TRAINING and not k.startswith("dora_"))


@pytest.fixture(scope="module")
def reports():
    return {arch: aot.compile_report(arch, kernels=TRAINING) + aot.compile_report(
        arch, dtypes=("bfloat16",), kernels=EXTRA) for arch in ARCHS}


@pytest.fixture(scope="module")
def reports_r64():
    return {arch: aot.compile_report(arch, dtypes=("bfloat16",), ranks=(64,), kernels=TRAINING + EXTRA)
            for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_all_kernels_compile(reports, arch):
    rows = reports[arch]
    assert set(EXTRA) >= {"grouped_shrink", "dx_acc", "ml_shrink", "ml_expand", "ml_fused"}
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, dt) for k in TRAINING for dt in ("bfloat16", "float16")} | {(k, "bfloat16") for k in EXTRA}
    for r in rows:
        assert r["regs"] > 0, r
        assert 0 < r["smem"] <= 227 * 1024, r


@pytest.mark.parametrize("arch", ARCHS)
def test_mma_family(reports, arch):
    for r in reports[arch]:
        # Every kernel's dots run on tensor cores...
        assert r["sass_mma"] == ("HGMMA" if arch == "sm_90" else "HMMA") or (
            arch == "sm_90" and r["kernel"] not in aot.GEMM_KERNELS and r["sass_mma"] == "HMMA"), r
        # ...and the big GEMMs use the architecture's native family.
        if r["kernel"] in aot.GEMM_KERNELS:
            assert r["mma"] == ("wgmma" if arch == "sm_90" else "mma.sync"), r


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(reports, reports_r64, arch):
    for r in reports[arch] + reports_r64[arch]:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_cli_table_and_json(capsys, reports):
    rows = reports["sm_90"]
    table = aot.format_table(rows)
    assert "fwd_gemm" in table and "wgmma" in table and "grouped_shrink" in table and "ml_fused" in table
    json.dumps(rows)  # JSON-serialisable for --json
    with pytest.raises(SystemExit):
        aot.main(["--arch", "sm_70"])
