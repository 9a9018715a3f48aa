"""Static statistics of a kernel's SASS (``cuobjdump -sass`` text), for the AOT report.

* ``tma``: the kernel issues TMA bulk tensor loads (UTMALDG);
* ``tma_store``: ... and TMA stores (UTMASTG);
* ``cp_async``: it uses cp.async (LDGSTS) loads, the sm_80 pipeline;
* ``max_store_bits``: the widest plain global store (STG: 16, 32, 64 or 128 bits per thread);
* ``main_loop_instrs`` / ``main_loop_int_share``: the main loop is the loop (backward branch and
  its target) holding the most tensor-core MMAs (HGMMA / HMMA), innermost on a tie; one iteration of it is
  the cheapest path through its basic blocks from the loop head back to it that passes an MMA (a
  flattened persistent loop skips its per-tile epilogue on that path, which then runs once per
  tile, not once per K step). Reported: that path's instruction count and the share of per-thread
  integer instructions on it (address arithmetic, Philox, predicates: what competes with the MMA
  issue for the ALUs). Uniform-datapath instructions (U*) are left out of the integer count: they
  run once per warp on a separate pipe.
"""

from __future__ import annotations

import re

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)")
_INT_OPS = {"IMAD", "IADD3", "IADD", "ISETP", "IMNMX", "IABS", "IMUL", "ISCADD", "LOP3", "LOP", "SHF", "SHL", "SHR",
            "LEA", "SEL", "PRMT", "FLO", "POPC", "BFE", "BFI", "BMSK", "SGXT", "VIADD", "VIMNMX", "IDP", "BREV"}
_MMA = ("HGMMA", "HMMA", "UTCHMMA")  # sm_90 wgmma, mma.sync, sm_100 tcgen05


def _instructions(sass: str) -> list[tuple[int, str, bool]]:
    """(address, instruction text without predicate, predicated) for each SASS instruction."""
    out = []
    for m in _LINE.finditer(sass):
        raw = m.group(2).strip()
        text = re.sub(r"^@!?U?P[T0-9]+\s+", "", raw)
        if text:
            out.append((int(m.group(1), 16), text, text != raw))
    return out


def _opcode(text: str) -> str:
    return text.split()[0].split(".")[0]


def _branch_target(text: str) -> int | None:
    m = _BRA.search(text)
    return int(m.group(1), 16) if m and _opcode(text) == "BRA" else None


def _loop_bodies(instrs):
    """(target index, branch index) of every backward branch."""
    index = {a: i for i, (a, _, _) in enumerate(instrs)}
    for i, (addr, text, _) in enumerate(instrs):
        target = _branch_target(text)
        if target is not None and target <= addr and target in index:
            yield index[target], i


def _k_step(instrs, head: int, end: int) -> list[str] | None:
    """Instructions on the cheapest path through body [head, end] from its first instruction back
    to the loop head that passes an MMA: one steady-state iteration (a flattened persistent loop
    skips its per-tile epilogue on that path)."""
    addr0 = instrs[head][0]
    body = instrs[head:end + 1]
    starts = {0} | {k + 1 for k, (_, t, _) in enumerate(body[:-1]) if _opcode(t) in ("BRA", "EXIT")}
    where = {a: k for k, (a, _, _) in enumerate(body)}
    targets = [_branch_target(text) for _, text, _ in body]
    starts |= {where[t] for t in targets if t is not None and t in where}
    starts = sorted(starts)
    blocks = [body[b:e] for b, e in zip(starts, starts[1:] + [len(body)])]
    first = {b: n for n, b in enumerate(starts)}
    best = None
    # Dijkstra over (block, MMA passed); edge cost = the instructions of the block entered.
    frontier = [(len(blocks[0]), 0, any(_opcode(t) in _MMA for _, t, _ in blocks[0]), [0])]
    done = set()
    while frontier:
        frontier.sort(key=lambda f: f[0])
        cost, n, mma, path = frontier.pop(0)
        if (n, mma) in done:
            continue
        done.add((n, mma))
        _, last, pred = blocks[n][-1]
        target = _branch_target(last)
        succ = []
        if target is not None:
            if target == addr0:
                if mma:
                    best = path
                    break
            elif target in where and where[target] in first:
                succ.append(first[where[target]])
        if (target is None or pred) and _opcode(last) != "EXIT" and n + 1 < len(blocks):
            succ.append(n + 1)
        for s in succ:
            has = mma or any(_opcode(t) in _MMA for _, t, _ in blocks[s])
            frontier.append((cost + len(blocks[s]), s, has, path + [s]))
    return None if best is None else [t for n in best for _, t, _ in blocks[n]]


def main_loop(instrs) -> list[str]:
    """One steady-state iteration of the main loop (empty when there is none): the loop holding
    the most MMA instructions, the innermost one on a tie (a K loop peeled for tiny K, or the
    low-rank dot's r loop, holds fewer)."""
    best = None
    for head, end in _loop_bodies(instrs):
        n_mma = sum(_opcode(t) in _MMA for _, t, _ in instrs[head:end + 1])
        if not n_mma:
            continue
        step = _k_step(instrs, head, end)
        if step is not None and (best is None or (-n_mma, end - head) < best[0]):
            best = ((-n_mma, end - head), step)
    return best[1] if best else []


def _access_bits(text: str) -> int:
    mods = text.split()[0].split(".")[1:]
    for mod, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if mod in mods:
            return bits
    return 32


def summary(sass: str) -> dict:
    instrs = _instructions(sass)
    ops = [_opcode(t) for _, t, _ in instrs]
    loop = main_loop(instrs)
    n_int = sum(_opcode(t) in _INT_OPS for t in loop)
    stores = [_access_bits(t) for _, t, _ in instrs if _opcode(t) == "STG"]
    return dict(tma="UTMALDG" in ops, tma_store="UTMASTG" in ops, cp_async="LDGSTS" in ops,
                main_loop_instrs=len(loop), main_loop_int_share=round(n_int / len(loop), 3) if loop else 0.0,
                max_store_bits=max(stores, default=0))
