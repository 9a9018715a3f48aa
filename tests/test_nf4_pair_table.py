"""reference/nf4.py's pair table is built once per code tensor and reused (bounded), with the same bits."""

from __future__ import annotations

import threading

import torch

from lora_triton.reference import nf4


def _fresh(code: torch.Tensor) -> torch.Tensor:
    hi, lo = code.float().repeat_interleave(16), code.float().repeat(16)
    return torch.stack((hi, lo), dim=1).contiguous().view(torch.int64).view(-1)


def test_table_is_cached_per_code_tensor_and_equals_a_fresh_build():
    nf4._PAIR_TABLES.clear()
    code_nf4, code_fp4 = nf4.code_table("nf4"), nf4.code_table("fp4")
    t1 = nf4.pair_table(code_nf4)
    assert nf4.pair_table(code_nf4) is t1  # reused
    assert torch.equal(t1, _fresh(code_nf4))
    assert torch.equal(t1.view(torch.float32).view(256, 2)[0x3C], torch.stack((code_nf4[3], code_nf4[12])))
    t2 = nf4.pair_table(code_fp4)
    assert t2 is not t1 and torch.equal(t2, _fresh(code_fp4))
    assert nf4.pair_table(code_nf4[:]) is t1  # a view of the same storage: the same table


def test_in_place_write_to_the_code_gives_a_new_table():
    code = nf4.code_table("nf4")
    before = nf4.pair_table(code)
    code.mul_(0.5)  # bumps the version counter
    after = nf4.pair_table(code)
    assert after is not before and torch.equal(after, _fresh(code))


def test_cache_is_bounded_and_inference_tensors_still_work():
    nf4._PAIR_TABLES.clear()
    codes = [nf4.code_table("nf4") * (1 + i / 100) for i in range(3 * nf4._PairTables.MAX_ENTRIES)]
    for code in codes:
        assert torch.equal(nf4.pair_table(code), _fresh(code))
    assert len(nf4._PAIR_TABLES) == nf4._PairTables.MAX_ENTRIES
    with torch.inference_mode():
        code = nf4.code_table("fp4")  # no version counter: built, not cached
        assert torch.equal(nf4.pair_table(code), _fresh(code))


def test_dequantize_is_bit_identical_with_the_cached_table_across_threads():
    torch.manual_seed(0)
    w = torch.randn(33, 70)
    packed, absmax = nf4.quantize_4bit(w, 64, "nf4")[:2]
    code = nf4.code_table("nf4")
    want = nf4.dequantize_4bit(packed, absmax, code, 64, w.shape, torch.float32)
    fresh = nf4.dequantize_range(packed, absmax, code, 64, 0, w.numel(), torch.float32, table=_fresh(code))
    assert torch.equal(want.reshape(-1), fresh)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        nf4.dequantize_4bit(packed, absmax, code, 64, w.shape, torch.float32))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(torch.equal(r, want) for r in results)
