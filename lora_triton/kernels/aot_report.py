"""Ahead-of-time compile report: kernel quality checked without a GPU.

Every LoRA kernel is compiled for a target GPU (sm_80 or sm_90) with its default config
(the first config of its family in ``autotune.py``), with the argument specialization the
runtime would apply on contiguous tensors (16-byte aligned pointers, unit inner strides,
dims divisible by 16). ``ptxas -v`` from the Triton wheel reports registers, spills and static
shared memory; the compiled metadata gives the dynamic shared memory Triton requests; the
PTX/SASS tell which MMA family the dots became (wgmma/HGMMA on sm_90, mma.sync/HMMA on sm_80).

CLI: ``lora-triton kernels --arch sm_80|sm_90 [--json]`` -> ``main(argv)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas

from . import autotune as at
from . import multi_lora as ml
from . import sass_stats
from .dora import AOT_KERNELS as DORA_AOT_KERNELS
from .gemm_launch import _set_blocks, fuse_da_fits
from .grouped_kernels import _grouped_shrink_kernel
from .lora_bwd import _da_kernel, _dudb_kernel, _dx_kernel
from .lora_fwd import _fwd_gemm_kernel, _shrink_kernel
from .lora_tma import _dx_tma_kernel, _fwd_gemm_tma_kernel
from .nf4 import GEMV_CONFIG, _nf4_dgrad_kernel, _nf4_fwd_kernel, _nf4_gemv_kernel

_TL = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_FLOAT_ARGS = {"scaling", "p", "inv_keep", "offset"}
_INT_ARGS = {"M", "N", "K", "R", "M_BUCKET", "SPLIT_K", "SPLIT_M", "G", "NUM_SLOTS", "tile_offset", "n_per_prog"}
# Pointers that are fp32 whatever the dtype (dB, dA outputs; grouped dropout p); the seed is int64.
_FP32_PTRS = {"db_ptr", "da_ptr", "p_ptr"}
# Per-kernel pointer types where the shared names mean something else (serving: int32 plan
# tensors, fp32 scalings / slot weights / split-K workspace u).
_ML_PTRS = dict(perm_ptr="*i32", tile_adapter_ptr="*i32", tile_row0_ptr="*i32", tile_rend_ptr="*i32",
                ranks_ptr="*i32", scal_ptr="*fp32", w_ptr="*fp32", u_ptr="*fp32")
_PTR_TYPES = {"ml_shrink": _ML_PTRS, "ml_expand": _ML_PTRS, "ml_fused": _ML_PTRS,
              "grouped_shrink": dict(roff_ptr="*i32")}
# 4-bit GEMMs (kernels/nf4.py): packed nibbles and double-quantized absmax codes are bytes, tables fp32.
_NF4_PTRS = dict(packed_ptr="*u8", absmax_ptr="*u8", code_ptr="*fp32", nabs_ptr="*fp32", ncode_ptr="*fp32")
_PTR_TYPES.update(nf4_fwd=_NF4_PTRS, nf4_dgrad=_NF4_PTRS, nf4_gemv=dict(_NF4_PTRS, ws_ptr="*fp32"))
# Strides that are 1 for contiguous row-major operands: the runtime specializes them to constexpr 1.
_UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_ur", "stride_wk", "stride_br", "stride_yn", "stride_dyn",
                 "stride_dur", "stride_dbr", "stride_dak", "stride_dxk"}



def _ml_config(kind: str):
    """The serving kernels' fixed launch configs (``multi_lora.multi_lora_linear``; 8 warps) at a
    given padded rank: prefill split path (BLOCK_M 64) for shrink/expand, decode tiles for fused."""
    def make(r_pad: int) -> triton.Config:
        block_r = 16 if r_pad <= 16 else 32
        meta = {"ml_shrink": dict(BLOCK_M=64, BLOCK_R=block_r, BLOCK_K=64, SPLIT_K=1),
                "ml_expand": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=block_r, SPLIT_K=1),
                "ml_fused": dict(BLOCK_M=16, BLOCK_R=ml._pow2(r_pad), BLOCK_K=64, BLOCK_N=64)}[kind]
        return triton.Config(dict(meta, DOT_PREC="tf32"), num_warps=ml._NUM_WARPS, num_stages=3)
    return make


# name -> (kernel, config family (or a function r_pad -> fixed triton.Config), flags compiled:
# the heaviest path, dropout on)
KERNELS = {
    "shrink": (_shrink_kernel, "shrink", dict(HAS_DROPOUT=True)),
    "fwd_gemm": (_fwd_gemm_kernel, "gemm", dict(HAS_W=True, HAS_BIAS=True)),
    "dudb": (_dudb_kernel, "dudb", dict(ATOMIC=True)),
    "da": (_da_kernel, "da", dict(HAS_DROPOUT=True)),
    "dx": (_dx_kernel, "gemm", dict(HAS_W=True, HAS_DROPOUT=True, ACCUMULATE=False, FUSE_DA=True)),
    "dx_p0": (_dx_kernel, "gemm", dict(HAS_W=True, HAS_DROPOUT=False, ACCUMULATE=False, FUSE_DA=False)),
    # persistent tensor-descriptor (TMA) twins of the main GEMMs: sm_90+ only (kernels/lora_tma.py)
    "fwd_gemm_tma": (_fwd_gemm_tma_kernel, "gemm_tma", dict(HAS_BIAS=True, W_KN=False, EPI_SPLIT=2)),
    "dx_tma": (_dx_tma_kernel, "gemm_tma", dict(HAS_DROPOUT=True, W_KN=False, EPI_SPLIT=2, ACCUMULATE=False,
                                                 FUSE_DA=True)),
    "dx_tma_p0": (_dx_tma_kernel, "gemm_tma", dict(HAS_DROPOUT=False, W_KN=False, EPI_SPLIT=2, ACCUMULATE=False,
                                                    FUSE_DA=False)),
    # grouped projections (q/k/v, gate/up): shrink once over x, dgrad accumulating into dx
    "grouped_shrink": (_grouped_shrink_kernel, "shrink", dict(HAS_DROPOUT=True)),
    "dx_acc": (_dx_kernel, "gemm", dict(HAS_W=True, HAS_DROPOUT=True, ACCUMULATE=True, FUSE_DA=True)),
    # multi-adapter serving (kernels/multi_lora.py)
    "ml_shrink": (ml._shrink_kernel, _ml_config("ml_shrink"), {}),
    "ml_expand": (ml._expand_kernel, _ml_config("ml_expand"), dict(HAS_W=True)),
    "ml_fused": (ml._fused_kernel, _ml_config("ml_fused"), dict(HAS_W=True)),
    # QLoRA: W dequantized from NF4 inside the K-loop (double-quant absmax), LoRA folded in
    "nf4_fwd": (_nf4_fwd_kernel, "gemm", dict(BLOCKSIZE=64, NESTED=True, K_ALIGNED=True, HAS_BIAS=True,
                                                        HAS_LORA=True)),
    "nf4_dgrad": (_nf4_dgrad_kernel, "gemm", dict(BLOCKSIZE=64, NESTED=True, K_ALIGNED=True, HAS_LORA=True)),
    # its decode path (M <= 16): split-K GEMV over the packed weight, fixed tiles (kernels/nf4.py GEMV_CONFIG)
    "nf4_gemv": (_nf4_gemv_kernel, lambda r_pad: triton.Config(
        {k: v for k, v in GEMV_CONFIG.items() if k.startswith("BLOCK_")}, num_warps=GEMV_CONFIG["num_warps"],
        num_stages=GEMV_CONFIG["num_stages"]),
        dict(BLOCKSIZE=64, NESTED=True, K_ALIGNED=True, K_EVEN=True, HAS_BIAS=True, HAS_LORA=True)),
}
GEMM_KERNELS = ("fwd_gemm", "dx", "dx_p0", "dx_acc", "fwd_gemm_tma", "dx_tma", "dx_tma_p0", "nf4_fwd", "nf4_dgrad")
TMA_KERNELS = ("fwd_gemm_tma", "dx_tma", "dx_tma_p0")  # compiled for sm_90+ only (never launched on sm_80)
# DoRA (kernels/dora.py): its own table of kernels, configs and fp32 pointers; tests/test_dora_aot.py.
KERNELS.update({name: entry[:3] for name, entry in DORA_AOT_KERNELS.items()})
_PTR_TYPES.update({name: entry[3] for name, entry in DORA_AOT_KERNELS.items()})


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448, "sm_100": 232448}
ARCHS = tuple(_SMEM_LIMIT)
# Shared memory per SM (the per-CTA limit above plus the 1 KB each resident CTA reserves).
_SMEM_PER_SM = {"sm_80": 167936, "sm_90": 233472, "sm_100": 233472}


class _Block:
    block_shape = None


def _desc_blocks(kernel, constexprs: dict) -> dict:
    """Block shape of each tensor-descriptor argument under this config (as the launcher sets them)."""
    descs = {name: _Block() for name in kernel.arg_names if name.endswith("_desc")}
    if descs:
        _set_blocks(dict(constexprs, **descs))
    return {name: d.block_shape for name, d in descs.items()}


def _spec(kernel, family, flags: dict, dtype: str, r_pad: int, arch: str = "sm_90", ptr_types=None):
    esize = 4 if dtype == "float32" else 2
    if callable(family):
        cfg = family(r_pad)
    else:
        cfg = at.select_config(family, esize, r_pad, 4096, flags.get("HAS_DROPOUT", False), _SMEM_LIMIT[arch],
                               int(arch.removeprefix("sm_")) // 10)
    constexprs = dict(cfg.kwargs, **flags)
    constexprs.update({k: v for k, v in (("R_PAD", r_pad), ("IEEE", False)) if k in kernel.arg_names})
    blocks = _desc_blocks(kernel, constexprs)
    ptr_types = ptr_types or {}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name.endswith("_desc"):
            signature[name] = f"tensordesc<{_TL[dtype]}{list(blocks[name])}>".replace(" ", "")
        elif name in ptr_types:
            signature[name] = ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name == "seed_ptr" else ("*fp32" if name in _FP32_PTRS else f"*{_TL[dtype]}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in _INT_ARGS:
            signature[name] = "i32"
            if name.startswith("stride_") or name in ("N", "K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"aot_report: no signature rule for {kernel.__name__}.{name}")
    missing = [k for k in constexprs if k not in kernel.arg_names]
    if missing:
        raise ValueError(f"aot_report: {kernel.__name__} has no args {missing}")
    return signature, constexprs, attrs, cfg


def _ptxas(ptx: str, arch: str) -> dict:
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    # The ptxas Triton itself uses for this arch (the wheel ships two; the PTX version must match).
    ptxas = get_ptxas(int(arch.removeprefix("sm_"))).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={target}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), static_smem=num(r"(\d+) bytes smem"),
                # ptxas C7515/C7510-style notes: wgmma pipelines serialized (a performance, not correctness, issue).
                wgmma_serialized="wgmma.mma_async instructions are serialized" in log)


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout


def _sass_mma(sass: str) -> str:
    for op in ("UTCHMMA", "HGMMA", "HMMA"):
        if op in sass:
            return op
    return "-"


def ctas_per_sm(regs: int, smem: int, num_warps: int, arch: str) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in units of 256), shared
    memory (1 KB reserved per CTA) and threads (2048 per SM)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_smem = _SMEM_PER_SM[arch] // (smem + 1024)
    return max(0, min(by_regs, by_smem, 2048 // (32 * num_warps), 32))


def compile_one(name: str, arch: str, dtype: str, r_pad: int = 16) -> dict:
    kernel, family, flags = KERNELS[name]
    cc = int(arch.removeprefix("sm_"))
    if flags.get("FUSE_DA") and not fuse_da_fits(cc // 10, r_pad):
        flags = dict(flags, FUSE_DA=False)  # what the launcher runs there (gemm_launch.fuse_da_fits)
    signature, constexprs, attrs, cfg = _spec(kernel, family, flags, dtype, r_pad, arch, _PTR_TYPES.get(name))
    t0 = time.perf_counter()
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    ptx = compiled.asm["ptx"]
    if "tcgen05.mma" in ptx:
        mma = "tcgen05"
    elif "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "none"
    sass = _sass(compiled.asm["cubin"])
    row = dict(kernel=name, arch=arch, dtype=dtype, r_pad=r_pad, config=dict(cfg.kwargs), num_warps=cfg.num_warps,
               num_stages=cfg.num_stages, mma=mma, sass_mma=_sass_mma(sass),
               smem=int(compiled.metadata.shared), compile_s=round(time.perf_counter() - t0, 2))
    row["flags"] = dict(flags)
    row.update(_ptxas(ptx, arch))
    row.update(sass_stats.summary(sass))
    row["ctas_per_sm"] = ctas_per_sm(row["regs"], row["smem"], cfg.num_warps, arch)
    return row


def compile_report(arch: str, dtypes=("bfloat16", "float16"), ranks=(16,), kernels=None) -> list[dict]:
    """One row per (rank, dtype, kernel): regs, spills, shared memory, MMA family. Needs no GPU.
    ``ranks`` are LoRA ranks; each compiles with its padded R_PAD (power of two >= 16);
    ``kernels``: names from KERNELS (default: all)."""
    kernels = [k for k in KERNELS if arch != "sm_80" or k not in TMA_KERNELS] if kernels is None else list(kernels)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if at.interpreting():
        # Under TRITON_INTERPRET=1 @triton.jit gives interpreter functions, which cannot be
        # compiled: do the work in a fresh interpreter-free process.
        cmd = [sys.executable, "-m", "lora_triton.kernels.aot_report", "--arch", arch, "--json"]
        for dt in dtypes:
            cmd += ["--dtype", dt]
        for r in ranks:
            cmd += ["--rank", str(r)]
        for name in kernels:
            cmd += ["--kernel", name]
        env = dict(os.environ, TRITON_INTERPRET="0")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout)
    pads = [max(16, triton.next_power_of_2(int(r))) for r in ranks]
    return [compile_one(name, arch, dt, rp) for rp in pads for dt in dtypes for name in kernels]


def format_table(rows: list[dict]) -> str:
    head = (f"{'kernel':<14} {'r_pad':>5} {'dtype':<9} {'tile (BMxBNxBK)':<16} {'w/s':<5} {'regs':>4} {'spills':>6} "
            f"{'smem':>7} {'cta/sm':>6} {'mma':<9} {'sass':<6} {'tma':<4} {'serial':<6} {'loop':>5} {'int%':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["config"]
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
        spills = r["spill_stores"] + r["spill_loads"]
        yes = lambda flag: "yes" if flag else "no"
        lines.append(f"{r['kernel']:<14} {r['r_pad']:>5} {r['dtype']:<9} {tile:<16} {r['num_warps']}/{r['num_stages']:<3} "
                     f"{r['regs']:>4} {spills:>6} {r['smem']:>7} {r['ctas_per_sm']:>6} {r['mma']:<9} "
                     f"{r['sass_mma']:<6} {yes(r['tma']):<4} {yes(r['wgmma_serialized']):<6} "
                     f"{r['main_loop_instrs']:>5} {100 * r['main_loop_int_share']:>5.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lora-triton kernels", description="AOT-compile the LoRA kernels and report "
                                 "registers, spills, shared memory and MMA family (no GPU needed).")
    ap.add_argument("--arch", default="sm_90", choices=list(ARCHS))
    ap.add_argument("--dtype", action="append", choices=["bfloat16", "float16"], help="default: both")
    ap.add_argument("--rank", action="append", type=int, help="LoRA rank(s) to compile for; default: 16")
    ap.add_argument("--kernel", action="append", choices=list(KERNELS), help="default: all")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    rows = compile_report(args.arch, tuple(args.dtype or ("bfloat16", "float16")), tuple(args.rank or (16,)),
                          args.kernel)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
