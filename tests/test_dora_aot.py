"""DoRA's Triton kernels compile ahead of time for sm_80 and sm_90 (no GPU needed): no spills, shared
memory within the limit, the GEMMs (forward with two accumulators, dgrad) on the architecture's MMA."""

from __future__ import annotations

import pytest

aot = pytest.importorskip("lora_triton.kernels.aot_report")

DORA = tuple(k for k in aot.KERNELS if k.startswith("dora_"))
GEMMS = ("dora_fwd", "dora_dx")


@pytest.fixture(scope="module")
def reports():
    return {arch: aot.compile_report(arch, dtypes=("bfloat16",), kernels=DORA) for arch in ("sm_80", "sm_90")}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_dora_kernels_compile_without_spills(reports, arch):
    rows = reports[arch]
    assert {r["kernel"] for r in rows} == set(DORA) >= {"dora_norm", "dora_fwd", "dora_dudb", "dora_da", "dora_dx"}
    for r in rows:
        assert r["regs"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["smem"] <= aot._SMEM_LIMIT[arch], r
        if r["kernel"] in GEMMS:
            assert r["mma"] == ("wgmma" if arch == "sm_90" else "mma.sync"), r
        # Register-computed tiles are only ever the MMA's B operand: the shrink reuses LoRA's tile loop
        # (masked x), the dgrad scales the W tile by g (dy diag(g) W = dy (diag(g) W)), not dy.
        assert not r["wgmma_serialized"], r
