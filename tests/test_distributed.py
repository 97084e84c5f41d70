"""Data parallelism with torchrun (gloo on CPU): two processes take exactly the steps of one
process on the same global batches, resume exactly, and only process 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
import json, sys
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import TensorDataset
from bayesdyn.data import DataSplits
from bayesdyn.inference import fit
from bayesdyn.inference.parallel import World, init_from_environment
from bayesdyn.models import DepthNet, DeterministicNet
from bayesdyn.nn import DepthStack, Residual

torch.set_default_dtype(torch.float64)
init_from_environment()
family, out, epochs, result = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5]
resume = sys.argv[4] == "1"
world = World()
g = torch.Generator().manual_seed(0)
x, y = torch.randn(72, 6, generator=g), torch.randint(0, 3, (72,), generator=g)
data = DataSplits("toy", TensorDataset(x, y), TensorDataset(x[:8], y[:8]), TensorDataset(x[:8], y[:8]),
                  3, (6,), (0.0,), (1.0,))
torch.manual_seed(0)
blocks = [Residual(nn.Sequential(nn.Linear(8, 8), nn.Tanh())) for _ in range(3)]
stack = DepthStack(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), blocks, nn.Linear(8, 3), input_ndim=1)
model = DepthNet(stack, num_classes=3) if family == "depth" else DeterministicNet(stack.truncated(3), 3)
guide = model.default_guide()
if out == "rank-own":  # each process its own folder: shows which processes write
    out = f"{result}-rank{world.rank}"
fit(model, guide, data, epochs=epochs, batch_size=20, lr=0.05, optimizer="sgd", device="cpu",
    out=out, resume=resume, progress=False, seed=3)
if world.main:
    state = {k: v.tolist() for k, v in {**model.state_dict(), **guide.state_dict()}.items()}
    Path(result).write_text(json.dumps(state))
if world.active:  # every process done with the group before it goes
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def _run(tmp_path, processes, family, out, epochs, resume=False, name="params.json"):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = tmp_path / name
    command = [sys.executable, str(script)] if processes == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(processes),
        "--master-port", str(29_500 + os.getpid() % 1000), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + [family, str(out), str(epochs), "1" if resume else "0",
                                     str(result)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in json.loads(result.read_text()).items()}


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9), (k, (a[k] - b[k]).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["depth", "deterministic"])
def test_two_processes_take_the_steps_of_one_on_the_global_batch(family, tmp_path):
    """72 examples, global batch 20 (parts of 10, 10 and a last 12 = 6 + 6): 4 steps per epoch,
    2 epochs, SGD; float64."""
    one = _run(tmp_path, 1, family, tmp_path / "one", 2, name="one.json")
    two = _run(tmp_path, 2, family, tmp_path / "two", 2, name="two.json")
    _close(one, two)
    start = _run(tmp_path, 1, family, tmp_path / "zero", 1, name="zero.json")
    assert any(not torch.allclose(start[k], two[k]) for k in two)  # it trained


@pytest.mark.slow
def test_resume_under_torchrun_equals_the_uninterrupted_run_and_only_rank_0_writes(tmp_path):
    straight = _run(tmp_path, 2, "depth", tmp_path / "straight", 3, name="straight.json")
    _run(tmp_path, 2, "depth", "rank-own", 1, name="own")
    assert (tmp_path / "own-rank0" / "checkpoint.pt").is_file()
    assert not (tmp_path / "own-rank1").exists()  # process 1 wrote nothing
    run = tmp_path / "own-rank0"
    resumed = _run(tmp_path, 1, "depth", run, 3, resume=True, name="resumed1.json")
    _close(straight, resumed)  # a checkpoint of 2 processes resumes in 1, exactly
    _run(tmp_path, 2, "depth", tmp_path / "half", 2, name="half.json")
    both = _run(tmp_path, 2, "depth", tmp_path / "half", 3, resume=True, name="resumed2.json")
    _close(straight, both)


@pytest.mark.slow
def test_torchrun_cli_trains_once_and_evaluates_once(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node",
                           "2", "--master-port", str(30_500 + os.getpid() % 1000), "-m",
                           "bayesdyn", "train", "depth", "--dataset", "digits", "--epochs", "2",
                           "--width", "16", "--device", "cpu", "--ood", "none", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # one process evaluated and printed
    history = json.loads((out / "history.json").read_text())["epochs"]
    assert len(history) == 2 and "val_accuracy" in history[-1]
    assert (out / "metrics.json").is_file() and (out / "posterior.nc").is_file()
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))


@pytest.mark.slow
def test_gpu_check_script_runs_every_stage_dry(tmp_path):
    """benchmarks/gpu_check.sh --dry: every stage at toy size on the CPU, so the script cannot
    rot between the sessions that have a GPU."""
    root = Path(__file__).parents[1]
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry", "--out",
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    stages = [line.split()[0] for line in summary.splitlines()]
    assert {"cuda-tests", "bench-fit", "bench-depth", "bench-nested", "bench-scale",
            "throughput", "repro-depth"} <= set(stages)
    assert "FAILED" not in summary
    results = (out / "RESULTS.md").read_text()
    assert "throughput: DUN-ResNet-18 vs ResNet-18" in results and "scale:" in results
