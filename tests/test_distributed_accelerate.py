"""``accelerate launch`` with 2 CPU processes runs a plain training script on an injected model: DDP under
the hood, the adapters equal one process training on the whole batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_distributed import FP32_TOL

pytest.importorskip("accelerate", reason="accelerate launch is the tested launcher")

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300  # a hang guard: two fresh interpreters import torch, accelerate and lora_triton


def test_accelerate_launch_two_cpu_processes(tmp_path):
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "result.json"
    env = {**os.environ, "LORA_TRITON_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "0", os.path.join(HERE, "accelerate_script.py"),
           str(out)]
    res = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["wrapper"] == "DistributedDataParallel"
    assert result["max_diff"] < FP32_TOL
