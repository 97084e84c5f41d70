"""Scale-out and streaming on the machine at hand (issue 16), as ratios measured in one run:

- data parallelism: seconds per epoch of ``fit`` in 2 processes (torchrun, gloo on CPU, NCCL on
  CUDA) against 1, for the same global batches (the processes split each batch); on a machine
  with 2 CPU cores the two processes share them, so this measures overhead, not a speed-up;
- streaming: seconds per epoch with batches streamed from host memory through a DataLoader
  against batches indexed from tensors already on the device.

    python benchmarks/bench_scale.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from common import append_results, header, synthetic_splits

from bayesdyn.inference import fit, resolve_device
from bayesdyn.inference.parallel import World, init_from_environment
from bayesdyn.models import DepthNet
from bayesdyn.nn import residual_mlp


def train(args, device, streaming="never") -> float:
    """Median seconds per epoch (after the first) of a DUN on synthetic data."""
    data, _, _ = synthetic_splits(args.examples, (784,))
    torch.manual_seed(0)
    model = DepthNet(residual_mlp(784, 10, args.width, 4), num_classes=10)
    history = fit(model, model.default_guide(), data, epochs=args.epochs, batch_size=256,
                  device=device, streaming=streaming, progress=False)
    return statistics.median(e["seconds"] for e in history.epochs[1:])


def worker(args):
    init_from_environment()
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seconds = train(args, device)
    if World().main:
        print(json.dumps({"seconds": seconds}))
    if World().active:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def processes(args, n: int) -> float:
    script = [str(Path(__file__).resolve()), "--worker", "--device", args.device, "--epochs",
              str(args.epochs), "--examples", str(args.examples), "--width", str(args.width)]
    command = [sys.executable, *script] if n == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(n), *script]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--examples", type=int, default=8192)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    device = resolve_device(args.device)
    one, two = processes(args, 1), processes(args, 2)
    resident, streamed = train(args, device, "never"), train(args, device, "always")
    lines = [*header(f"scale: data parallelism and streaming, DUN MLP 784-{args.width}x4, "
                     f"{args.examples} examples, batch 256", device), "",
             "| variant | s / epoch | ratio |", "|---|---|---|",
             f"| 1 process | {one:.3f} | 1.000 |", f"| 2 processes (torchrun) | {two:.3f} | "
             f"{two / one:.3f} |", f"| tensors on the device | {resident:.3f} | 1.000 |",
             f"| streamed through a DataLoader | {streamed:.3f} | {streamed / resident:.3f} |", "",
             f"Median of epochs 2..{args.epochs}. The 2 processes split each global batch of 256; "
             f"{os.cpu_count()} CPU cores are shared by both on this machine."]
    append_results(lines)


if __name__ == "__main__":
    main()
