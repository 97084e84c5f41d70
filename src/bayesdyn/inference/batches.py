"""Where ``fit``'s minibatches come from, and their augmentation.

- ``TensorSource``: tensors held on the training device (the fast path for data that fits): each
  epoch is a seeded permutation, so a resumed run sees the same batches.
- ``LoaderSource``: any ``torch.utils.data.DataLoader`` (data that does not fit, custom
  pipelines): batches are moved to the device as they arrive.
- ``augment``: random crop after zero padding and horizontal flip, applied to a batch on its
  device, seeded by (seed, epoch, step) so a resumed run augments identically.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..validation import check_inputs
from .checkpoint import rng_state, set_rng_state

DATA_KINDS = ("a bayesdyn DataSplits, an (x, y) pair of tensors, a TensorDataset of (x, y) or a "
              "DataLoader yielding (x, y) batches")


class TensorSource:
    """Inputs ``x [N, ...]`` and labels ``y [N]`` as tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device, dtype=None) -> TensorSource:
        """On ``device``, inputs in ``dtype`` (the model's: float64 data meets float32 weights)."""
        return TensorSource(self.x.to(device, dtype), self.y.to(device))

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def head(self, k: int = 2):
        return self.x[:k], self.y[:k]

    def check(self, num_classes, input_shape, what: str, regression: bool = False) -> None:
        check_inputs(self.x, self.y, num_classes, input_shape, what=what, regression=regression)

    def batches(self, epoch: int, seed: int, batch_size: int, start_step: int = 0,
                epoch_rng=None):
        """``(x, y)`` batches of epoch ``epoch`` from step ``start_step`` on."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(
            seed * 100_003 + epoch)).to(self.x.device)
        for idx in order.split(batch_size)[start_step:]:
            yield self.x[idx], self.y[idx]

    def all_batches(self, batch_size: int):
        yield from zip(self.x.split(batch_size), self.y.split(batch_size), strict=True)


class StreamSource(TensorSource):
    """Tensors kept in host memory, streamed to the device batch by batch through a
    ``DataLoader`` (pinned memory, non-blocking copies, ``num_workers`` workers), for data that
    does not fit on the device. The batches are the same seeded permutation as ``TensorSource``'s,
    so a streamed run equals a device-resident one and resumes exactly."""

    def __init__(self, x, y, device, dtype=None, num_workers: int = 0):
        super().__init__(x, y)
        self.device, self.dtype, self.num_workers = torch.device(device), dtype, num_workers

    def to(self, device, dtype=None) -> StreamSource:
        return StreamSource(self.x, self.y, device, dtype, self.num_workers)

    def head(self, k: int = 2):
        return self._move(self.x[:k], self.y[:k])

    def _move(self, x, y):
        return x.to(self.device, self.dtype, non_blocking=True), y.to(self.device, non_blocking=True)

    def _stream(self, index_batches):
        loader = DataLoader(TensorDataset(self.x, self.y), batch_sampler=index_batches,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield self._move(x, y)

    def batches(self, epoch: int, seed: int, batch_size: int, start_step: int = 0,
                epoch_rng=None):
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(
            seed * 100_003 + epoch))
        yield from self._stream([idx.tolist() for idx in order.split(batch_size)[start_step:]])

    def all_batches(self, batch_size: int):
        yield from self._stream([list(range(i, min(i + batch_size, len(self))))
                                 for i in range(0, len(self), batch_size)])


def place(source, device: torch.device, dtype, streaming: str = "auto", num_workers: int = 0):
    """``source`` on the training device: tensors go to the device unless ``streaming`` says
    to stream them (``always``; ``auto``: when they would take more than a quarter of the free
    GPU memory); a DataLoader is always streamed."""
    if not isinstance(source, TensorSource) or isinstance(source, StreamSource):
        return source.to(device, dtype)
    stream = streaming == "always"
    if streaming == "auto" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        stream = source.x.nelement() * source.x.element_size() > free / 4
    if stream:
        return StreamSource(source.x.cpu(), source.y.cpu(), device, dtype, num_workers)
    return source.to(device, dtype)


class LoaderSource:
    """A ``DataLoader`` of ``(x, y)`` batches; its own batch size applies."""

    def __init__(self, loader: DataLoader, device=None, dtype=None):
        self.loader, self.device, self.dtype = loader, device, dtype

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def to(self, device, dtype=None) -> LoaderSource:
        return LoaderSource(self.loader, device, dtype)

    def num_batches(self, batch_size: int) -> int:
        return len(self.loader)

    def _move(self, batch):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("a DataLoader for fit must yield (x, y) pairs of tensors")
        pin = self.device is not None and torch.device(self.device).type == "cuda"
        x, y = batch
        return x.to(self.device, self.dtype, non_blocking=pin), y.to(self.device, non_blocking=pin)

    def head(self, k: int = 2):
        x, y = self._move(next(iter(self.loader)))
        return x[:k], y[:k]

    def check(self, num_classes, input_shape, what: str, regression: bool = False) -> None:
        x, y = self.head(len(self.loader.dataset))  # the first batch: a loader is not scanned
        check_inputs(x, y, num_classes, input_shape, what=f"{what} (first batch)",
                     regression=regression)

    def batches(self, epoch: int, seed: int, batch_size: int, start_step: int = 0,
                epoch_rng=None):
        """The loader's batches; resuming mid-epoch replays the loader's shuffle from the RNG
        state the epoch started with, skips the batches already done, then restores the RNG."""
        if start_step and epoch_rng is not None:
            now = rng_state()
            set_rng_state(epoch_rng)
            iterator = iter(self.loader)
            for _ in range(start_step):
                next(iterator)
            set_rng_state(now)
        else:
            iterator = iter(self.loader)
        for batch in iterator:
            yield self._move(batch)

    def all_batches(self, batch_size: int):
        for batch in self.loader:
            yield self._move(batch)


def as_source(data, what: str):
    """A ``TensorSource`` or ``LoaderSource`` from any of ``DATA_KINDS`` (no ``DataSplits``)."""
    if isinstance(data, DataLoader):
        return LoaderSource(data)
    if isinstance(data, TensorDataset):
        data = data.tensors
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        return TensorSource(*data)
    raise TypeError(f"{what}: expected {DATA_KINDS}, got {type(data).__name__}")


def training_sources(data, val=None):
    """``(train, val or None)`` sources from ``fit``'s ``data`` (and ``val``) arguments."""
    if hasattr(data, "train") and hasattr(data, "val"):  # DataSplits
        if val is not None:
            raise ValueError("pass val= only with tensors, a TensorDataset or a DataLoader: a "
                             "DataSplits already holds its validation split")
        train, val = data.train, data.val
    else:
        train = data
    train = as_source(train, "training data")
    if len(train) == 0:
        raise ValueError("the training data is empty")
    val = None if val is None else as_source(val, "validation data")
    return train, (val if val is not None and len(val) else None)


def augment(x: torch.Tensor, generator: torch.Generator, crop_padding: int = 0,
            hflip: bool = False) -> torch.Tensor:
    """Random crop of each image ``[B, C, H, W]`` back to ``H x W`` after zero padding by
    ``crop_padding`` pixels, and a horizontal flip of each image with probability 1/2, on
    ``x``'s device (torchvision's ``RandomCrop(padding=p)`` + ``RandomHorizontalFlip``)."""
    b, _, h, w = x.shape
    if crop_padding:
        p = crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy, dx = (torch.randint(0, 2 * p + 1, (b,), generator=generator, device=x.device)
                  for _ in range(2))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B,1,H,1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B,1,1,W]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    if hflip:
        flip = torch.rand(b, generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
