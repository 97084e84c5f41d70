import json

import pytest
import torch

from bayesdyn.data import DataSplits
from bayesdyn.inference import TrainingDivergedError, fit, load_checkpoint
from bayesdyn.inference import checkpoint as ckpt_mod
from bayesdyn.recipes import Recipe, build

FIT = dict(batch_size=64, lr=3e-3, device="cpu", progress=False)


def make(digits, method="depth"):
    torch.manual_seed(0)  # the same initial weights every time
    return build(Recipe(method, depth=2, width=16), digits.input_shape, 10)


def params(*modules):
    return torch.cat([p.detach().flatten() for m in modules for p in m.state_dict().values()
                      if p.is_floating_point()])


def test_minibatch_estimates_average_to_the_full_batch_elbo(digits):
    model, guide = make(digits)
    model.eval()  # BatchNorm on running stats: the per-example terms do not depend on the batch
    x, y = digits.train.tensors
    n = len(x)
    with torch.no_grad():
        full, _ = model.fast_loss(guide, x, y, n)
        chunks = list(zip(x.split(100), y.split(100), strict=True))
        # each minibatch estimate is unbiased; weighting by batch share recovers the full ELBO
        mean = sum(model.fast_loss(guide, xb, yb, n)[0] * len(xb) / n for xb, yb in chunks)
    assert mean.item() == pytest.approx(full.item(), rel=1e-5)


def test_resume_reproduces_uninterrupted_run(digits, tmp_path):
    torch.manual_seed(0)
    model_a, guide_a = make(digits)
    fit(model_a, guide_a, digits, epochs=2, out=tmp_path / "a", **FIT)
    model_b, guide_b = make(digits)
    fit(model_b, guide_b, digits, epochs=1, out=tmp_path / "b", **FIT)
    model_c, guide_c = make(digits)  # a fresh process would rebuild from scratch like this
    fit(model_c, guide_c, digits, epochs=2, out=tmp_path / "b", resume=True, **FIT)
    assert torch.equal(params(model_a, guide_a), params(model_c, guide_c))
    hist_a = json.loads((tmp_path / "a" / "history.json").read_text())["epochs"]
    hist_b = json.loads((tmp_path / "b" / "history.json").read_text())["epochs"]
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert drop(hist_a) == drop(hist_b)


def test_interrupt_mid_epoch_saves_and_resumes_exactly(digits, tmp_path, monkeypatch):
    import importlib

    fit_mod = importlib.import_module("bayesdyn.inference.fit")

    model_a, guide_a = make(digits)
    fit(model_a, guide_a, digits, epochs=2, out=tmp_path / "a", **FIT)

    calls = {"n": 0}
    original = fit_mod.Trainer._step

    def step_then_interrupt(self, loss):  # as if Ctrl-C arrived during step 5 of epoch 2
        original(self, loss)
        calls["n"] += 1
        if calls["n"] == 21 + 5:
            self.interrupted = True

    monkeypatch.setattr(fit_mod.Trainer, "_step", step_then_interrupt)
    model_b, guide_b = make(digits)
    with pytest.raises(KeyboardInterrupt):
        fit(model_b, guide_b, digits, epochs=2, out=tmp_path / "b", **FIT)
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == (1, 5)
    monkeypatch.setattr(fit_mod.Trainer, "_step", original)
    model_c, guide_c = make(digits)
    fit(model_c, guide_c, digits, epochs=2, out=tmp_path / "b", resume=True, **FIT)
    assert torch.equal(params(model_a, guide_a), params(model_c, guide_c))


def test_crash_during_save_keeps_previous_checkpoint(digits, tmp_path, monkeypatch):
    model, guide = make(digits)
    fit(model, guide, digits, epochs=1, out=tmp_path, **FIT)
    before = load_checkpoint(tmp_path / "checkpoint.pt")

    def torn_save(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        fit(model, guide, digits, epochs=2, out=tmp_path, resume=True, **FIT)
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["epoch"] == before["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_nan_loss_names_the_step_and_keeps_last_good_checkpoint(digits, tmp_path, monkeypatch):
    model, guide = make(digits)
    real = model.fast_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss, terms = real(*args)
        return (loss * float("nan"), terms) if calls["n"] == 1 + 21 + 3 else (loss, terms)

    monkeypatch.setattr(model, "fast_loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="epoch 2, step 3"):
        fit(model, guide, digits, epochs=3, out=tmp_path, **FIT)
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())


def bad_data(digits, x=None, y=None):
    return DataSplits("digits", torch.utils.data.TensorDataset(
        x if x is not None else digits.train.tensors[0],
        y if y is not None else digits.train.tensors[1]), digits.val, digits.test, 10,
        digits.input_shape, digits.mean, digits.std)


def test_clear_errors_for_bad_inputs(digits):
    model, guide = make(digits)
    y_bad = digits.train.tensors[1].clone()
    y_bad[3] = 12
    with pytest.raises(ValueError, match=r"labels out of range: \[12\]"):
        fit(model, guide, bad_data(digits, y=y_bad), epochs=1, **FIT)
    x_wrong = torch.zeros(len(digits.train), 1, 28, 28)
    with pytest.raises(ValueError, match=r"expected \[batch, 1, 8, 8\]"):
        fit(model, guide, bad_data(digits, x=x_wrong), epochs=1, **FIT)
    x_nan = digits.train.tensors[0].clone()
    x_nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit(model, guide, bad_data(digits, x=x_nan), epochs=1, **FIT)
    with pytest.raises(ValueError, match="invalid optimizer"):
        fit(model, guide, digits, epochs=1, optimizer="rmsprop", **FIT)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            fit(model, guide, digits, epochs=1, batch_size=64, device="cuda")


def test_resume_without_checkpoint_is_clear(digits, tmp_path):
    model, guide = make(digits)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        fit(model, guide, digits, epochs=1, out=tmp_path, resume=True, **FIT)


def test_early_stopping_and_history(digits):
    model, guide = make(digits, "deterministic")
    history = fit(model, guide, digits, epochs=40, lr=0.05, early_stopping=2, **{
        k: v for k, v in FIT.items() if k != "lr"})
    assert history.objective == "fast"
    assert history.stopped_early and len(history.epochs) < 40
    assert {"loss", "nll", "val_accuracy", "val_nll", "lr"} <= set(history.epochs[0])


def test_pyro_objective_gives_the_same_training(digits):
    runs = []
    for objective in ("fast", "pyro"):
        model, guide = make(digits)
        h = fit(model, guide, digits, epochs=2, objective=objective, **FIT)
        runs.append((h, params(model, guide)))
    assert runs[1][0].objective == "pyro"
    # Same objective value along the way (Adam amplifies float noise in near-zero gradients, so
    # parameters are compared loosely; exact value/gradient equality is tested per family).
    fast_loss, pyro_loss = runs[0][0]["loss"], runs[1][0]["loss"]
    assert fast_loss[0] == pytest.approx(pyro_loss[0], rel=1e-4)
    assert fast_loss[1] == pytest.approx(pyro_loss[1], rel=1e-2)  # float noise grows with steps
    assert torch.allclose(runs[0][1], runs[1][1], atol=0.05)


# --- inputs: tensors, TensorDataset, DataLoader -----------------------------------------------

def test_fit_accepts_tensors_a_tensordataset_and_a_dataloader(digits):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits.train.tensors
    runs = []
    for data in [(x, y), TensorDataset(x, y)]:
        model, guide = make(digits)
        h = fit(model, guide, data, val=digits.val.tensors, epochs=1, **FIT)
        runs.append(params(model, guide))
        assert "val_nll" in h.epochs[0]
    assert torch.equal(*runs)  # the same batches either way
    model, guide = make(digits)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    h = fit(model, guide, loader, val=DataLoader(digits.val, batch_size=50), epochs=3, **FIT)
    assert h["loss"][-1] < h["loss"][0] and h.epochs[-1]["val_accuracy"] > 0.5
    assert "val_nll" not in fit(model, guide, (x, y), epochs=1, **FIT).epochs[0]  # no val: fine
    with pytest.raises(TypeError, match="DataLoader"):
        fit(model, guide, x, epochs=1, **FIT)
    with pytest.raises(ValueError, match="already holds its validation split"):
        fit(model, guide, digits, val=(x, y), epochs=1, **FIT)
    with pytest.raises(ValueError, match="empty"):
        fit(model, guide, (x[:0], y[:0]), epochs=1, **FIT)


def test_dataloader_run_resumes_exactly_after_an_interrupt(digits, tmp_path, monkeypatch):
    import importlib

    from torch.utils.data import DataLoader

    fit_mod = importlib.import_module("bayesdyn.inference.fit")
    loader = DataLoader(digits.train, batch_size=64, shuffle=True)
    model_a, guide_a = make(digits)
    fit(model_a, guide_a, loader, epochs=2, out=tmp_path / "a", **FIT)
    calls, original = {"n": 0}, fit_mod.Trainer._step

    def step_then_interrupt(self, loss):
        original(self, loss)
        calls["n"] += 1
        if calls["n"] == 21 + 7:
            self.interrupted = True

    monkeypatch.setattr(fit_mod.Trainer, "_step", step_then_interrupt)
    model_b, guide_b = make(digits)
    with pytest.raises(KeyboardInterrupt):
        fit(model_b, guide_b, loader, epochs=2, out=tmp_path / "b", **FIT)
    monkeypatch.setattr(fit_mod.Trainer, "_step", original)
    model_c, guide_c = make(digits)
    fit(model_c, guide_c, loader, epochs=2, out=tmp_path / "b", resume=True, **FIT)
    assert torch.equal(params(model_a, guide_a), params(model_c, guide_c))


# --- parameters by role -----------------------------------------------------------------------

def test_weight_decay_reaches_point_weights_only(digits):
    """Nested family: the Gaussian weights' means and scales live on the model's layers, yet are
    variational: decay must leave them alone (BatchNorm and bias point estimates take it)."""
    from bayesdyn.models import NestedNet
    from bayesdyn.nn import nested_mlp

    runs = []
    x, y = digits.train.tensors
    for decay in (0.0, 10.0):  # one full-batch SGD step: the gradients themselves are equal
        torch.manual_seed(0)
        model = NestedNet(nested_mlp(64, 10, (16,), groups=4, input_shape=(1, 8, 8)), 10,
                          input_shape=(1, 8, 8))
        guide = model.default_guide()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(model, guide, (x, y), epochs=1, weight_decay=decay, optimizer="sgd", momentum=0.0,
            **{**FIT, "batch_size": len(x)})
        runs.append(dict(model.named_parameters()) | dict(guide.named_parameters()))
    variational = {"net.blocks.0.layer.weight_mu", "net.blocks.0.layer.weight_log_sigma",
                   "net.head.weight_mu", "net.head.weight_log_sigma", "rho.0"}
    for name in runs[0]:
        same = torch.equal(runs[0][name], runs[1][name])
        if name in variational:
            assert same, f"weight decay reached the variational parameter {name}"
        elif start.get(name, torch.zeros(1)).abs().sum() > 0:  # decay of 0 changes nothing
            assert not same, f"no weight decay on the point estimate {name}"


def test_warmup_holds_the_depth_posterior_only(digits, monkeypatch):
    """DUN's warm-up: q(d) stays at its initialisation; the network and an AutoNormal over the
    output weights train from the first epoch."""
    import importlib

    from bayesdyn.models import DepthNet
    from bayesdyn.nn import residual_mlp

    fit_mod = importlib.import_module("bayesdyn.inference.fit")
    torch.manual_seed(0)
    model = DepthNet(residual_mlp(64, 10, 16, 2, input_shape=(1, 8, 8)), num_classes=10,
                     input_shape=(1, 8, 8), output_prior_scale=1.0)
    guide = model.default_guide()
    guide(*digits.train[:2])
    start = {n: p.detach().clone() for n, p in guide.named_parameters()}
    after_epoch = []
    original = fit_mod.Trainer._end_epoch

    def record(self, *args):
        after_epoch.append({n: p.detach().clone() for n, p in self.guide.named_parameters()})
        return original(self, *args)

    monkeypatch.setattr(fit_mod.Trainer, "_end_epoch", record)
    fit(model, guide, digits, epochs=2, warmup_epochs=1, **FIT)
    depth_logits = [n for n in start if n.endswith("logits")]
    assert depth_logits and all(torch.equal(after_epoch[0][n], start[n]) for n in depth_logits)
    assert all(not torch.equal(after_epoch[1][n], start[n]) for n in depth_logits)
    assert all(not torch.equal(after_epoch[0][n], start[n]) for n in start if "locs" in n)


def test_config_is_validated_before_any_work(digits, tmp_path):
    model, guide = make(digits)
    bad = [dict(clip_grad=-1), dict(early_stopping=0), dict(lr=float("nan")), dict(epochs=0),
           dict(batch_size=2.5), dict(seed=-1), dict(warmup_epochs=3), dict(crop_padding=-1),
           dict(weight_decay=-1e-4), dict(momentum=1.0)]
    for options in bad:
        name = next(iter(options))
        with pytest.raises(ValueError, match=f"invalid {name}="):
            fit(model, guide, digits, out=tmp_path, **{"epochs": 2, **FIT, **options})
    assert not list(tmp_path.iterdir())


# --- augmentation and feedback ----------------------------------------------------------------

def test_augmentation_is_torchvisions_crop_and_flip_on_the_device():
    from bayesdyn.inference.batches import augment

    x = torch.randn(6, 2, 5, 7)
    g = torch.Generator().manual_seed(3)
    out = augment(x, g, crop_padding=2, hflip=True)
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order, by hand
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(6):
        crop = padded[b, :, dy[b]:dy[b] + 5, dx[b]:dx[b] + 7]
        assert torch.equal(out[b], crop.flip(-1) if flip[b] else crop)
    assert 0 < flip.sum() < 6


def test_augmented_training_resumes_exactly(digits, tmp_path):
    aug = dict(crop_padding=1, hflip=True, **FIT)
    model_a, guide_a = make(digits)
    fit(model_a, guide_a, digits, epochs=2, out=tmp_path / "a", **aug)
    model_b, guide_b = make(digits)
    fit(model_b, guide_b, digits, epochs=1, out=tmp_path / "b", **aug)
    model_c, guide_c = make(digits)
    fit(model_c, guide_c, digits, epochs=2, out=tmp_path / "b", resume=True, **aug)
    assert torch.equal(params(model_a, guide_a), params(model_c, guide_c))
    model_d, guide_d = make(digits)
    fit(model_d, guide_d, digits, epochs=2, **FIT)
    assert not torch.equal(params(model_a, guide_a), params(model_d, guide_d))


def test_piped_log_gets_one_line_per_epoch_and_notebooks_get_a_bar(monkeypatch):
    import subprocess
    import sys

    from bayesdyn.inference import progress

    code = """
import torch
from bayesdyn.data import load
from bayesdyn.inference import fit
from bayesdyn.recipes import Recipe, build
data = load("digits")
model, guide = build(Recipe("deterministic", depth=1, width=8), data.input_shape, 10)
fit(model, guide, data, epochs=3, batch_size=256, device="cpu")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch=")]
    assert len(lines) == 3 and "val_accuracy=" in lines[-1]
    assert "IProgress" not in result.stderr
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    bar = progress.Progress(None)
    from tqdm.notebook import tqdm as notebook_tqdm

    assert bar.mode == "bar" and bar._tqdm is notebook_tqdm


# --- scale: streaming, mixed precision, memory format -------------------------------------------

def test_streamed_batches_equal_device_resident_ones(digits, tmp_path):
    runs = []
    for streaming in ("never", "always"):
        model, guide = make(digits)
        fit(model, guide, digits, epochs=2, streaming=streaming, num_workers=0, **FIT)
        runs.append(params(model, guide))
    assert torch.equal(*runs)
    from bayesdyn.inference.batches import StreamSource, place

    source = place(__import__("bayesdyn.inference.batches", fromlist=["x"]).TensorSource(
        *digits.train.tensors), torch.device("cpu"), torch.float32, "always")
    assert isinstance(source, StreamSource)


def test_bf16_autocast_trains_with_fp32_likelihood_and_kl(digits):
    from bayesdyn.inference.parallel import autocast

    model, guide = make(digits)
    x, y = digits.train[:64]
    with autocast("bf16", torch.device("cpu")):
        loss, terms = model.fast_loss(guide, x, y, len(digits.train))
        assert model.backbone(x).dtype == torch.bfloat16  # the network runs in bf16
    assert loss.dtype == terms["kl"].dtype == terms["nll"].dtype == torch.float32
    history = fit(model, guide, digits, epochs=3, precision="bf16", **FIT)
    assert history["loss"][-1] < history["loss"][0]


def test_channels_last_conv_net_trains_like_the_default_format(digits):
    from bayesdyn.recipes import Recipe, build

    data = load_fashion_like(digits)
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model, guide = build(Recipe("depth", arch="conv", depth=2, width=8), data.input_shape, 10)
        h = fit(model, guide, data, epochs=2, channels_last=channels_last, **FIT)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                    and m.in_channels > 1 and m.kernel_size[0] > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        runs.append(h["loss"])
    assert runs[1] == pytest.approx(runs[0], rel=1e-3)  # same steps up to convolution rounding


def load_fashion_like(digits):
    """Digits upsampled to 16x16 (a conv net's input), as a DataSplits."""
    from bayesdyn.data import load

    return load("digits", image_size=16)


@pytest.mark.slow
def test_compiled_objective_trains_like_the_eager_one(digits):
    runs = []
    for compile_ in (False, True):
        model, guide = make(digits)
        h = fit(model, guide, digits, epochs=1, compile=compile_, **FIT)
        runs.append(h["loss"][0])
    assert runs[1] == pytest.approx(runs[0], rel=2e-3)  # fused kernels round differently
