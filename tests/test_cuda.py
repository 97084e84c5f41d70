"""GPU correctness: the fast paths train on CUDA without a single host-device sync per step, and
give the CPU's numbers. Skipped (with a reason) on machines without CUDA."""

import pytest
import torch

from bayesdyn.inference import FitConfig
from bayesdyn.inference.fit import Trainer
from bayesdyn.recipes import Recipe, build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["depth", "nested", "nested-dropout", "deterministic", "exits",
                                    "boosted-exits"])
def test_training_step_has_no_host_device_sync(method, digits):
    torch.manual_seed(0)
    model, guide = build(Recipe(method, depth=2, width=32), digits.input_shape, 10)
    trainer = Trainer(model, guide, digits, None, FitConfig(batch_size=64),
                      torch.device("cuda"), None, False)
    x, y = trainer.train_data.x[:64], trainer.train_data.y[:64]
    running = trainer._running_state(0)
    for _ in range(2):  # warm-up: lazy CUDA initialisation may sync once
        trainer._step(trainer.loss(x, y)[0] / trainer.n)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            loss, terms = trainer.loss(x, y)
            trainer._step(loss / trainer.n)
            trainer._accumulate(running, loss, terms, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_depth_loss_matches_cpu(digits):
    torch.manual_seed(0)
    model, guide = build(Recipe("depth", depth=2, width=32), digits.input_shape, 10)
    model.eval()
    x, y = (t[:128] for t in digits.train.tensors)
    cpu, _ = model.fast_loss(guide, x, y, 1000)
    model.cuda(), guide.cuda()
    gpu, _ = model.fast_loss(guide, x.cuda(), y.cuda(), 1000)
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)
