"""Where dropout seeds come from: one rule for eager, torch.compile, checkpointing and data parallelism.

Every seed the ops draw themselves (``seed=None``) comes from ``draw_seeds``: ``n`` int64 values from
torch's generator on the target device, ``torch.randint(0, 2**62, (n,))``, then offset by the process's
rank (below). It is a torch.library custom op tagged ``nondeterministic_seeded`` (a plain eager call runs
its body directly, ``ops/eager.py``: the same values), so under
``torch.compile`` it stays an opaque call into eager torch -- inductor does not replace the draw with its
own RNG stream and does not merge two draws -- and a compiled run draws the same seeds, hence the same
dropout masks, as an eager run after the same ``torch.manual_seed``.

Gradient checkpointing (``torch.utils.checkpoint``, reentrant or not, and transformers'
``gradient_checkpointing_enable``) restores torch's RNG state before recomputing a forward
(``preserve_rng_state=True``, the default), so the recomputation draws the same seeds and regenerates
the same masks.

Eager CPU draws also tell ``reference/mask_memo.py`` which seeds were drawn, so
a training step's small masks can be drawn ahead in one batch (``reference/mask_forecast.py``); that
peeks at a copy of the generator and never changes which seeds are drawn.

Data parallelism: ranks usually share one ``torch.manual_seed`` (replicas must start equal), which would
give every rank the same masks on different data. When torch.distributed is initialised with more than
one process, rank ``k`` adds ``k * RANK_STRIDE`` (mod 2**62) to each drawn seed: masks differ per rank,
and a run stays reproducible from the one seed and the world layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import mask_memo
from .eager import fast_path

SEED_LIMIT = 2**62
RANK_STRIDE = 0x9E3779B97F4A7C15 % SEED_LIMIT  # 2**64 / golden ratio: ranks land far apart


def rank_offset() -> int:
    """``rank * RANK_STRIDE`` (mod 2**62) in a multi-process torch.distributed run, else 0."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return 0
    return dist.get_rank() * RANK_STRIDE % SEED_LIMIT


def _ranked(seeds: Tensor) -> Tensor:
    """Drawn seeds moved to this rank's stream (``rank_offset``; unchanged on one process)."""
    offset = rank_offset()
    return seeds if offset == 0 else (seeds + offset) % SEED_LIMIT


_COUNTERS: dict[torch.device, Tensor] = {}


def _counter(device: torch.device) -> Tensor:
    """A per-device int64 tensor each custom-op draw increments: the draws mutate it, so no compiler pass may
    merge two of them (common-subexpression elimination ignores the nondeterministic tag) or reorder them.
    Eager draws (``draw_seeds``' fast path) leave it alone: they run in program order."""
    counter = _COUNTERS.get(device)
    if counter is None:
        with torch.inference_mode(False):  # an inference tensor could not be updated outside inference mode
            counter = _COUNTERS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return counter


def _fresh(n: int, device: torch.device) -> Tensor:
    """The draw itself: ``n`` seeds from torch's generator on ``device``, on this rank's stream."""
    return _ranked(torch.randint(0, SEED_LIMIT, (n,), dtype=torch.int64, device=device))


@torch.library.custom_op("lora_triton::draw_seeds", mutates_args=("counter",),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _draw_seeds(counter: Tensor, n: int) -> Tensor:
    counter.add_(1)
    return _fresh(n, counter.device)


@_draw_seeds.register_fake
def _(counter, n):
    return counter.new_empty((n,))


def draw_seeds(n: int, device: torch.device, eager: bool | None = None) -> Tensor:
    """``n`` fresh dropout seeds (int64 tensor [n] on ``device``), by the rule in the module docstring.

    A plain eager call runs the op's body directly (``ops/eager.py``; ``eager``: the caller's own
    ``fast_path`` verdict, None to check here): the same draw from the same generator, without the custom
    op's dispatch. It leaves the counter alone: the counter only keeps compilers from merging or reordering
    draws, and eager runs them in program order. Eager CPU draws are reported to ``mask_memo`` whatever the
    backend (a few list appends): its forecast plans only the masks the reference path asked for."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if eager is None:
        eager = fast_path(_counter(device))
    if not eager:
        return _draw_seeds(_counter(device), int(n))
    seeds = _fresh(int(n), device)
    if device.type == "cpu":
        mask_memo.seeds_drawn(seeds, peek_seeds)  # small masks of the step drawn ahead, batched
    return seeds


def peek_seeds(k: int) -> list[int]:
    """The next ``k`` CPU seeds ``draw_seeds`` will return (one draw of k or k draws of 1 alike: torch's CPU
    generator yields the same values either way), read from a copy of the generator: nothing is consumed."""
    gen = torch.Generator()
    gen.set_state(torch.default_generator.get_state())
    return _ranked(torch.randint(0, SEED_LIMIT, (k,), dtype=torch.int64, generator=gen)).tolist()
