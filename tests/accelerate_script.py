"""Run by tests/test_distributed_accelerate.py through ``accelerate launch`` (2 CPU processes)."""

import json
import os
import sys

import torch
from accelerate import Accelerator
from test_distributed import STEPS, _adapter, _batch, _diff, _model, _train


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    x, y = _batch()
    single = _adapter(_train(_model(), x, y))
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    wrapped, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = x.shape[0] // world
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    for _ in range(STEPS):
        loss = (wrapped(x[shard]).float() - y[shard]).square().mean()
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
    result = {"world": world, "wrapper": type(wrapped).__name__, "max_diff": _diff(_adapter(model), single)}
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a background C++ thread of the distributed runtime can abort the process
    # there ("terminate called without an active exception") after the run itself has finished.
    os._exit(0)
