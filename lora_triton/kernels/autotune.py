"""Launch configurations for the LoRA kernels: generated config lists, a shared-memory
pruner, the M bucketing used as autotune key, and the single small config the CPU
interpreter runs (autotuning there would only multiply the test time).

Every kernel is a plain ``@triton.jit`` function; ``tuned(kernel, family)`` wraps it with
``triton.autotune`` on a GPU and the launchers pass ``interp_meta(family)`` explicitly under
the interpreter. The *first* config of each family is the default the AOT report compiles.
"""

from __future__ import annotations

import functools
import os

import triton

# Families: "gemm" (base GEMM + expand, dgrad GEMM + LoRA epilogue; pointer loads, the sm_80 path),
# "gemm_tma" (their persistent tensor-descriptor twins, sm_90+), "shrink" (U = D(x) A^T),
# "dudb" (dU and dB from one pass over dy), "da" (dA = dU^T D(x)).
_INTERP_META = {
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
    "gemm_tma": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, FLATTEN=True),
    "shrink": dict(BLOCK_M=32, BLOCK_K=32),
    "dudb": dict(BLOCK_M=32, BLOCK_N=32),
    "da": dict(BLOCK_M=32, BLOCK_K=32),
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """LORA_TRITON_AUTOTUNE=0 runs every kernel with its default config (quick GPU checks)."""
    return os.environ.get("LORA_TRITON_AUTOTUNE", "1") not in ("", "0")


def interp_meta(family: str) -> dict:
    return dict(_INTERP_META[family])


def m_bucket(m: int) -> int:
    """Autotune key for M: next power of two, capped (tokens vary per batch, tiles do not)."""
    return min(1 << max(int(m) - 1, 0).bit_length(), 4096)


def _gemm_configs():
    cfgs = []
    # First = default (AOT report): the classic 128x128x64 tensor-core tile.
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5), (128, 128, 32, 4, 5),
        (32, 128, 64, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3),
    ]:
        cfgs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _gemm_tma_configs():
    # First = default: 128x256x64 in 3 stages, one persistent program per SM; fits without spills
    # because the low-rank term shares the main accumulator (172 registers, sm_90 bf16 r=16).
    # FLATTEN=False (tile loop around the K loop: no epilogue overlap, a tighter K loop) is tuned
    # against it on the two large tiles.
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=fl), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s, fl in [(128, 256, 64, 8, 3, True), (128, 128, 64, 8, 4, True),
                                         (128, 256, 64, 8, 3, False), (128, 128, 64, 8, 4, False),
                                         (256, 128, 64, 8, 3, True), (128, 128, 64, 4, 4, True),
                                         (128, 64, 64, 4, 4, True), (64, 128, 64, 4, 4, True),
                                         (64, 64, 64, 4, 5, True), (16, 128, 128, 4, 4, True)]]


def _shrink_configs():
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bk, w, s in [(64, 128, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (32, 128, 4, 4),
                                 (16, 256, 4, 3), (128, 128, 8, 3)]]


def _dudb_configs():
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 128, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (32, 128, 4, 3),
                                 (16, 128, 4, 3), (128, 64, 4, 3)]]


def _da_configs():
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bk, w, s in [(64, 128, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 3),
                                 (32, 128, 4, 4), (16, 128, 4, 3)]]


CONFIGS = {"gemm": _gemm_configs, "gemm_tma": _gemm_tma_configs, "shrink": _shrink_configs, "dudb": _dudb_configs,
           "da": _da_configs}


def default_config(family: str) -> triton.Config:
    return CONFIGS[family]()[0]


@functools.cache
def _cc_major() -> int:
    """The current GPU's compute capability major (9 without a driver: what the AOT report assumes)."""
    try:
        import torch

        return int(torch.cuda.get_device_capability()[0])
    except Exception:
        return 9


@functools.cache
def _smem_limit() -> int:
    try:
        import torch

        dev = torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"])
    except Exception:  # no driver: assume A100's opt-in limit
        return 166912


def smem_bytes(family: str, meta: dict, stages: int, esize: int, r_pad: int) -> int:
    """Shared memory a config's pipelined operand tiles need (the compiler's own estimate is close)."""
    bm = meta["BLOCK_M"]
    r_blk = min(r_pad, 64)  # all but the shrink walk r in chunks of 64
    if family in ("gemm", "gemm_tma"):
        main = (bm * meta["BLOCK_K"] + meta["BLOCK_K"] * meta["BLOCK_N"]) * stages
        lora = bm * r_blk + r_blk * meta["BLOCK_N"]
        if family == "gemm_tma":
            lora += bm * meta["BLOCK_N"] // 2  # TMA store staging: one epilogue half
    elif family == "shrink":
        main = (bm * meta["BLOCK_K"] + meta["BLOCK_K"] * r_pad) * stages
        lora = 0
    elif family == "dudb":
        main = (bm * meta["BLOCK_N"] + meta["BLOCK_N"] * r_blk) * stages
        lora = bm * r_blk
    else:
        main = (r_blk * bm + bm * meta["BLOCK_K"]) * stages
        lora = 0
    return (main + lora) * esize


def _live_fp32(family: str, meta: dict, num_warps: int, has_dropout: bool, r_pad: int = 0) -> int:
    """fp32 values a thread keeps live at the peak, from the tiles the kernel really holds.

    GEMMs: the [BM, BN] accumulator (the low-rank term shares it); with dropout the masked dgrad
    epilogue works on column quarters next to it, and Philox keeps about four words per masked
    element, so the quarter costs about as much again as the accumulator. The others: only the
    masked [BM, BK] (or [BM, BN]) operand tile counts, Philox's words on it dominate."""
    threads = 32 * num_warps
    if family in ("gemm", "gemm_tma"):
        acc = meta["BLOCK_M"] * meta["BLOCK_N"] // threads
        live = 2 * acc if has_dropout else acc
        if family == "gemm_tma" and r_pad:
            # The persistent kernels also carry one r chunk of U and B ([BM + BN, <= 64], 16-bit)
            # through registers on their way to shared memory.
            live += (meta["BLOCK_M"] + meta["BLOCK_N"]) * min(r_pad, 64) // (2 * threads)
        return live
    return meta["BLOCK_M"] * meta.get("BLOCK_K", meta.get("BLOCK_N", 0)) // threads if has_dropout else 0


def prune(family: str, configs, esize: int, r_pad: int, m: int = 4096, has_dropout: bool = False,
          smem_limit: int | None = None, cc_major: int | None = None):
    """Drop configs over the shared-memory limit, configs whose live registers would spill (or
    serialize wgmma), and tiles much taller than the (bucketed) M; always keeps at least one config."""
    limit = smem_limit or _smem_limit()
    fits = [c for c in configs if smem_bytes(family, c.kwargs, c.num_stages, esize, r_pad) <= limit]
    fits = fits or configs[-1:]
    # Caps calibrated on `lora-triton kernels --arch sm_90` (bf16/fp16): pointer GEMMs at 128 live
    # fp32 compile at 109-185 registers (r 16-256); persistent GEMMs at <= 160 at 183-239 without
    # spills (128x256 up to r = 32, 128x128 with dropout up to r = 64), 176 (128x256, r = 64) at 255;
    # other kernels spill beyond 64 masked elements per thread.
    cap = {"gemm": 128, "gemm_tma": 160}.get(family, 64)
    fits = [c for c in fits if _live_fp32(family, c.kwargs, c.num_warps, has_dropout, r_pad) <= cap] or fits[-1:]
    if family == "gemm_tma" and (cc_major or _cc_major()) >= 10:
        # sm_100: this Triton fails to compile the flattened persistent loop (TritonGPUHoistTMEMAlloc);
        # the nested loops compile (tcgen05.mma, TMA, no spills: lora-triton kernels --arch sm_100).
        fits = [c for c in fits if not c.kwargs.get("FLATTEN", True)] or fits[-1:]
    if family == "gemm_tma" and has_dropout:
        # The masked dgrad epilogue inside a flattened tile loop makes ptxas serialize the wgmma
        # pipeline (C7515; 128x128x64: serialized flattened, clean nested): nested loops only.
        fits = [c for c in fits if not c.kwargs.get("FLATTEN", True)] or fits[-1:]
    # Tall tiles on a handful of tokens waste the tensor cores; keep the short ones.
    return [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, m)] or fits[-1:]


def select_config(family: str, esize: int, r_pad: int, m: int = 4096, has_dropout: bool = False,
                  smem_limit: int | None = None, cc_major: int | None = None) -> triton.Config:
    """The config used without autotuning (and by the AOT report): first survivor of ``prune``."""
    return prune(family, CONFIGS[family](), esize, r_pad, m, has_dropout, smem_limit, cc_major)[0]


def _pruner(family: str, tensor_arg: str):
    def early_config_prune(configs, named_args, **kwargs):
        get = lambda name, default: named_args.get(name, kwargs.get(name, default))
        return prune(family, configs, named_args[tensor_arg].element_size(), get("R_PAD", 16),
                     get("M_BUCKET", 4096), bool(get("HAS_DROPOUT", False)))

    return early_config_prune


def tuned(kernel, family: str, key: list, tensor_arg: str, reset_to_zero=None, pre_hook=None, restore_value=None):
    """Wrap a plain jit kernel with triton.autotune (GPU only); ``pre_hook(nargs)`` runs before each
    config's launch (the descriptor kernels set their block shapes there). ``reset_to_zero`` /
    ``restore_value``: outputs a kernel accumulates into, zeroed / restored around each timed run."""
    configs = CONFIGS[family]()
    if pre_hook is not None:
        configs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=pre_hook)
                   for c in configs]
    return triton.autotune(
        configs=configs, key=key,
        prune_configs_by={"early_config_prune": _pruner(family, tensor_arg)},
        reset_to_zero=reset_to_zero, restore_value=restore_value,
    )(kernel)


def launch(kernel, family: str, tensor_arg: str, tuned_kernel, grid, *args, **kwargs):
    """Launch a plain jit kernel the one way the launchers share: the interpreter's small tiles, the
    first ``prune`` survivor (autotuning off), or ``tuned_kernel()``, the cached autotuner, built only
    when autotuning is on."""
    if interpreting():
        kernel[grid](*args, **kwargs, **interp_meta(family))
    elif not autotune_enabled():
        named = dict(zip(kernel.arg_names, args), **kwargs)
        cfg = select_config(family, named[tensor_arg].element_size(), named["R_PAD"], named["M_BUCKET"],
                            bool(named.get("HAS_DROPOUT", False)))
        kernel[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned_kernel()[grid](*args, **kwargs)
