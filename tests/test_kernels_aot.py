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
# grouped, multi-adapter serving, TMA, dx p=0; DoRA's kernels are checked in test_dora_aot.py
EXTRA = tuple(k for k in aot.KERNELS if k not in TRAINING and not k.startswith("dora_"))


def _extra(arch):
    return [k for k in EXTRA if arch != "sm_80" or k not in aot.TMA_KERNELS]


@pytest.fixture(scope="module")
def reports():
    return {arch: aot.compile_report(arch, kernels=TRAINING) + aot.compile_report(
        arch, dtypes=("bfloat16",), kernels=_extra(arch)) for arch in ARCHS}


@pytest.fixture(scope="module")
def reports_r64():
    return {arch: aot.compile_report(arch, dtypes=("bfloat16",), ranks=(64,), kernels=TRAINING + tuple(_extra(arch)))
            for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_all_kernels_compile(reports, arch):
    rows = reports[arch]
    assert set(EXTRA) >= {"grouped_shrink", "dx_acc", "ml_shrink", "ml_expand", "ml_fused"}
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, dt) for k in TRAINING for dt in ("bfloat16", "float16")} | {(k, "bfloat16") for k in _extra(arch)}
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
    assert "fwd_gemm_tma" in table and "cta/sm" in table and "int%" in table
    json.dumps(rows)  # JSON-serialisable for --json
    with pytest.raises(SystemExit):
        aot.main(["--arch", "sm_70"])


def test_sm90_main_gemms_use_tma_and_fit(reports, reports_r64):
    """The persistent GEMMs load (and, outside the masked dgrad epilogue, store) through TMA, run
    wgmma unserialized, and their default tiles fit: 128x256 at r = 16, one CTA per SM."""
    rows = [r for r in reports["sm_90"] + reports_r64["sm_90"] if r["kernel"] in aot.TMA_KERNELS]
    assert {(r["kernel"], r["r_pad"]) for r in rows} == {(k, rp) for k in aot.TMA_KERNELS for rp in (16, 64)}
    for r in rows:
        assert r["tma"] and r["mma"] == "wgmma", r
        assert r["tma_store"] == (r["kernel"] != "dx_tma"), r
        assert not r["wgmma_serialized"] and r["ctas_per_sm"] >= 1, r
        # The main loop is lean: descriptors leave little integer work per K step.
        assert 0 < r["main_loop_instrs"] <= 140 and r["main_loop_int_share"] < 0.3, r
    tile = lambda r: (r["config"]["BLOCK_M"], r["config"]["BLOCK_N"])
    wide = {r["kernel"] for r in rows if r["r_pad"] == 16 and tile(r) == (128, 256)}
    assert wide == {"fwd_gemm_tma", "dx_tma_p0"}
    # The pointer GEMMs (sm_80 path) keep cp.async pipelines on sm_80.
    assert all(r["cp_async"] for r in reports["sm_80"] if r["kernel"] in ("fwd_gemm", "dx", "dx_p0"))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_serialized_wgmma(reports, reports_r64, arch):
    # The masked shrinks take D(x) as the MMA's shared-memory operand (U^T = A D(x)^T): from
    # registers it serialized wgmma (ptxas C7515).
    for r in reports[arch] + reports_r64[arch]:
        assert not r["wgmma_serialized"], r


def test_ctas_per_sm_model():
    # 64K registers, 2048 threads, shared memory per SM (1 KB reserved per CTA).
    assert aot.ctas_per_sm(109, 98304, 8, "sm_90") == 2
    assert aot.ctas_per_sm(189, 192536, 8, "sm_90") == 1
    assert aot.ctas_per_sm(32, 30720, 8, "sm_90") == 7  # limited by shared memory, not by threads (8)
    assert aot.ctas_per_sm(255, 8192, 4, "sm_80") == 2


def test_serving_stores_are_vectorized(reports):
    # ml_fused once stored y 16 bits at a time (its column mask was runtime-bounded); ml_expand 128.
    rows = {r["kernel"]: r for r in reports["sm_90"]}
    assert rows["ml_fused"]["max_store_bits"] >= 64 and rows["ml_expand"]["max_store_bits"] == 128


def test_sm100_main_gemms_compile_on_tcgen05():
    """Blackwell, as far as this Triton goes: the main GEMMs compile to tcgen05 MMAs (UTCHMMA) without
    spills, the persistent ones with TMA (nested loops: the flattened one fails to compile here)."""
    rows = aot.compile_report("sm_100", dtypes=("bfloat16",), kernels=("fwd_gemm", "dx", "fwd_gemm_tma", "dx_tma_p0"))
    for r in rows:
        assert r["mma"] == "tcgen05" and r["sass_mma"] == "UTCHMMA", r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["smem"] <= aot._SMEM_LIMIT["sm_100"], r
        assert r["tma"] == r["kernel"].endswith(("_tma", "_tma_p0")), r
        assert r["config"].get("FLATTEN", False) is False, r
