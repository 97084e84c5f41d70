"""Every bad input gets a clear error before any work, naming the bad value and the fix; nothing is
written or changed; faults (kill -9, a full disk, Ctrl-C, corrupt files) lose nothing."""

import errno
import hashlib
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bayesdyn.cli import main
from bayesdyn.data import load
from bayesdyn.distributions import Downhill, StickBreakingOrdering, TruncatedGeometric
from bayesdyn.evaluation import evaluate
from bayesdyn.guides import DepthGuide, NestedGuide
from bayesdyn.inference import fit, load_checkpoint, predict, to_datatree
from bayesdyn.models import DepthNet, DeterministicNet, NestedNet
from bayesdyn.nn import nested_mlp, residual_mlp, resnet_depth, vds_convnet
from bayesdyn.recipes import Recipe, build

TRAIN = ["train", "depth", "--dataset", "digits", "--no-progress"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its content hash (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "trained"
    assert main(TRAIN + ["--epochs", "2", "--width", "16", "--depth", "2", "--ood", "none",
                         "--out", str(out)]) == 0
    return out


# --- CLI: (extra arguments, words the message must contain) -----------------------------------

CLI_CASES = {
    "epochs zero": (["--epochs", "0"], ["epochs=0", "integer >= 1"]),
    "epochs negative": (["--epochs", "-3"], ["epochs=-3", ">= 1"]),
    "batch size zero": (["--batch-size", "0"], ["batch_size=0", ">= 1"]),
    "lr zero": (["--lr", "0"], ["lr=0", "> 0"]),
    "lr negative": (["--lr", "-0.1"], ["lr=-0.1", "> 0"]),
    "lr nan": (["--lr", "nan"], ["lr=nan", "finite"]),
    "seed negative": (["--seed", "-1"], ["seed=-1", "[0, 2**32)"]),
    "clip-grad negative": (["--clip-grad", "-1"], ["clip_grad=-1", "> 0"]),
    "early stopping zero": (["--early-stopping", "0"], ["early_stopping=0", ">= 1"]),
    "weight decay negative": (["--weight-decay=-1e-4"], ["weight_decay=-0.0001", ">= 0"]),
    "momentum one": (["--optimizer", "sgd", "--momentum", "1.5"], ["momentum=1.5", "[0, 1)"]),
    "warm-up too long": (["--epochs", "3", "--warmup-epochs", "3"], ["warmup_epochs=3", "[0, epochs=3)"]),
    "crop padding negative": (["--crop-padding", "-2"], ["crop_padding=-2", ">= 0"]),
    "num samples zero": (["--num-samples", "0"], ["num_samples=0", ">= 1"]),
    "unknown ood": (["--ood", "bogus"], ["'bogus'", "'default', 'none'"]),
    "ood is the dataset": (["--ood", "digits"], ["'digits'", "'default', 'none'"]),
    "unknown device": (["--device", "tpu"], ["'tpu'", "cpu or cuda"]),
    "width zero": (["--width", "0"], ["width=0", ">= 1"]),
    "depth zero": (["--depth", "0"], ["depth=0", ">= 1"]),
}

CLI_METHOD_CASES = {
    "unknown method": (["train", "bogus", "--dataset", "digits"], ["'bogus'", "choose one of"]),
    "unknown dataset": (["train", "depth", "--dataset", "bogus"], ["'bogus'", "choose one of"]),
    "nested keep-prob above 1": (["train", "nested", "--dataset", "digits", "--keep-prob", "1.5"],
                                 ["keep_prob=1.5", "(0, 1)"]),
    "nested keep-prob zero": (["train", "nested", "--dataset", "digits", "--keep-prob", "0"],
                              ["keep_prob=0", "(0, 1)"]),
    "nested width not groupable": (["train", "nested", "--dataset", "digits", "--width", "20"],
                                   ["20", "multiple of 16"]),
    "nested on regression data": (["train", "nested", "--dataset", "diabetes"],
                                  ["diabetes", "deterministic, depth"]),
    "image backbone on vectors": (["train", "depth", "--dataset", "diabetes", "--arch", "resnet18"],
                                  ["resnet18", "vectors"]),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_rejects_bad_training_options_before_any_work(case, tmp_path, capsys):
    extra, words = CLI_CASES[case]
    out = tmp_path / "run"
    assert main(TRAIN + ["--out", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


@pytest.mark.parametrize("case", CLI_METHOD_CASES)
def test_cli_rejects_bad_methods_and_recipes_before_writing(case, tmp_path, capsys):
    argv, words = CLI_METHOD_CASES[case]
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_cli_cuda_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        assert torch.cuda.device_count() >= 1  # the error path needs a machine without CUDA
        return
    assert main(TRAIN + ["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_cli_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    assert main(TRAIN + ["--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "keep me"


RESUME_CASES = {
    "fewer epochs than done": (["--epochs", "1"], ["already trained 2 epochs", "--epochs 2 or more"]),
    "another learning rate": (["--epochs", "3", "--lr", "0.5"], ["lr differs", "0.5"]),
    "another seed": (["--epochs", "3", "--seed", "4"], ["seed differs"]),
    "bad ood on resume": (["--epochs", "3", "--ood", "bogus"], ["'bogus'"]),
    "bad epochs on resume": (["--epochs", "0"], ["epochs=0"]),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_refused_resume_leaves_the_run_as_it_was(case, trained_run, capsys):
    extra, words = RESUME_CASES[case]
    before = snapshot(trained_run)
    argv = TRAIN + ["--width", "16", "--depth", "2", "--ood", "none", "--out", str(trained_run),
                    "--resume"] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert snapshot(trained_run) == before


def test_resume_without_a_run_and_a_run_that_exists(trained_run, tmp_path, capsys):
    assert main(TRAIN + ["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    before = snapshot(trained_run)
    assert main(TRAIN + ["--width", "16", "--depth", "2", "--out", str(trained_run)]) == 2
    assert "--resume" in capsys.readouterr().err and snapshot(trained_run) == before


class _Payload:
    """Unpickling this would create a file: a checkpoint must never run it."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["BAYESDYN_TEST_MARKER"]),))


def _break(run: Path, kind: str) -> None:
    if kind == "truncated config":
        (run / "config.json").write_text((run / "config.json").read_text()[:40])
    elif kind == "truncated history":
        (run / "history.json").write_text('{"epochs": [{"epoch": 1, ')
    elif kind == "corrupt checkpoint":
        data = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    elif kind == "empty checkpoint":
        (run / "checkpoint.pt").write_bytes(b"")
    elif kind == "foreign checkpoint":
        torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt")
    elif kind == "pickled object":
        with open(run / "checkpoint.pt", "wb") as fh:
            pickle.dump({"model": _Payload()}, fh)


BROKEN = {"truncated config": "config.json", "truncated history": "history.json",
          "corrupt checkpoint": "corrupt or not a bayesdyn checkpoint",
          "empty checkpoint": "corrupt or not a bayesdyn checkpoint",
          "foreign checkpoint": "corrupt or not a bayesdyn checkpoint",
          "pickled object": "corrupt or not a bayesdyn checkpoint"}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_run_files_are_named_and_nothing_unsafe_is_advised(kind, trained_run, tmp_path,
                                                                 capsys, monkeypatch):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "executed"
    monkeypatch.setenv("BAYESDYN_TEST_MARKER", str(marker))
    _break(run, kind)
    before = snapshot(run)
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert BROKEN[kind] in err and "weights_only=False" not in err and "Traceback" not in err
    assert not marker.exists()  # nothing in the file was executed
    assert snapshot(run) == before


EVALUATE_CASES = {
    "not a run": (None, [], ["not a run directory"]),
    "bad ood": ("run", ["--ood", "bogus"], ["'bogus'", "'default', 'none'"]),
    "zero samples": ("run", ["--num-samples", "0"], ["num_samples", ">= 1"]),
}


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_evaluate_rejects_bad_options(case, trained_run, tmp_path, capsys):
    where, extra, words = EVALUATE_CASES[case]
    run = trained_run if where == "run" else tmp_path
    before = snapshot(run)
    assert main(["evaluate", str(run)] + extra) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert snapshot(run) == before


# --- Python API: (callable, exception type, message regex) ------------------------------------

def _digits():
    return load("digits")


def _small_depth(**kwargs):
    return DepthNet(residual_mlp(64, 10, 8, 2, input_shape=(1, 8, 8)), num_classes=10,
                    input_shape=(1, 8, 8), **kwargs)


def _fit(**options):
    data = _digits()
    model = _small_depth()
    return fit(model, model.default_guide(), data, device="cpu", progress=False,
               **{"epochs": 1, **options})


def _fit_on(x, y):
    model = _small_depth()
    return fit(model, model.default_guide(), (x, y), epochs=1, device="cpu", progress=False)


def _nested(**kwargs):
    return NestedNet(nested_mlp(6, 3, (8,), groups=4), 3, **kwargs)


DIGITS_X = torch.rand(20, 1, 8, 8)
API_CASES = {
    "fit clip_grad negative": (lambda: _fit(clip_grad=-1.0), ValueError, r"clip_grad=-1\.0.*> 0"),
    "fit early_stopping zero": (lambda: _fit(early_stopping=0), ValueError, r"early_stopping=0.*>= 1"),
    "fit epochs zero": (lambda: _fit(epochs=0), ValueError, r"epochs=0.*>= 1"),
    "fit batch_size float": (lambda: _fit(batch_size=2.5), ValueError, r"batch_size=2\.5.*integer"),
    "fit lr nan": (lambda: _fit(lr=math.nan), ValueError, r"lr=nan.*finite"),
    "fit unknown optimizer": (lambda: _fit(optimizer="rmsprop"), ValueError, r"'rmsprop'.*adam"),
    "fit unknown option": (lambda: _fit(learning_rate=0.1), TypeError, r"learning_rate"),
    "fit labels out of range": (lambda: _fit_on(DIGITS_X, torch.full((20,), 12)), ValueError,
                                r"\[12.*valid: 0\.\.9"),
    "fit float labels": (lambda: _fit_on(DIGITS_X, torch.zeros(20)), TypeError, r"y\.long\(\)"),
    "fit nan inputs": (lambda: _fit_on(DIGITS_X * math.nan, torch.zeros(20).long()), ValueError,
                       r"NaN or Inf"),
    "fit wrong shape": (lambda: _fit_on(torch.rand(20, 64), torch.zeros(20).long()), ValueError,
                        r"\(20, 64\).*\[batch, 1, 8, 8\]"),
    "fit data is a list": (lambda: fit(_small_depth(), DepthGuide(_small_depth()), [1, 2, 3],
                                       epochs=1), TypeError, r"DataSplits, an \(x, y\) pair"),
    "fit empty data": (lambda: _fit_on(DIGITS_X[:0], torch.zeros(0).long()), ValueError, r"empty"),
    "fit labels wrong length": (lambda: _fit_on(DIGITS_X, torch.zeros(5).long()), ValueError,
                                r"labels have shape \(5,\).*one label per row"),
    "nested temperature nan": (lambda: _nested(temperature=math.nan), ValueError, r"temperature=nan"),
    "nested kl_weight nan": (lambda: _nested(kl_weight=math.nan), ValueError, r"kl_weight=nan"),
    "nested kl_weight negative": (lambda: _nested(kl_weight=-1.0), ValueError, r"kl_weight=-1\.0"),
    "nested keep_prob one": (lambda: _nested(keep_prob=1.0), ValueError, r"keep_prob=1\.0.*\(0, 1\)"),
    "nested prior scale zero": (lambda: _nested(prior_scale=0.0), ValueError, r"prior_scale=0\.0"),
    "nested 20 classes on 3 outputs": (lambda: NestedNet(nested_mlp(6, 3, (8,), groups=4), 20),
                                       ValueError, r"3 outputs but 20.*build it with 20"),
    "depth 20 classes on 10 outputs": (lambda: DepthNet(residual_mlp(6, 10, 8, 2), num_classes=20),
                                       ValueError, r"10 outputs but 20"),
    "deterministic 20 classes on 10": (lambda: DeterministicNet(torch.nn.Linear(6, 10), 20),
                                       ValueError, r"10 outputs but 20"),
    "regression with 10 outputs": (lambda: DepthNet(residual_mlp(6, 10, 8, 2),
                                                    likelihood="regression"),
                                   ValueError, r"10 outputs but 1"),
    "depth prior unnormalised": (lambda: DepthNet(residual_mlp(6, 3, 8, 2),
                                                  prior=[0.2, 0.2, 0.2]),
                                 ValueError, r"sum to 0\.6.*normalise"),
    "depth prior negative": (lambda: DepthNet(residual_mlp(6, 3, 8, 2), prior=[-0.5, 1.0, 0.5]),
                             ValueError, r"finite and positive"),
    "depth prior continuous": (lambda: DepthNet(residual_mlp(6, 3, 8, 2),
                                                prior=torch.distributions.Normal(0.0, 1.0)),
                               TypeError, r"Normal.*discrete distribution"),
    "depth noise scale zero": (lambda: DepthNet(residual_mlp(6, 1, 8, 2), likelihood="regression",
                                                noise_scale=0.0), ValueError, r"noise_scale=0\.0"),
    "residual_mlp width zero": (lambda: residual_mlp(6, 3, width=0), ValueError, r"width=0.*>= 1"),
    "residual_mlp depth negative": (lambda: residual_mlp(6, 3, depth=-1), ValueError,
                                    r"depth=-1.*>= 0"),
    "vds_convnet channels zero": (lambda: vds_convnet(1, 10, channels=0), ValueError,
                                  r"channels=0"),
    "resnet empty stage": (lambda: resnet_depth(3, 10, stages=(0, 2), widths=(4, 8)),
                           ValueError, r"stages\[0\]=0"),
    "resnet unknown adapters": (lambda: resnet_depth(3, 10, adapters="dense"), ValueError,
                                r"'dense'"),
    "nested_mlp one group": (lambda: nested_mlp(6, 3, (8,), groups=1), ValueError, r"groups=1"),
    "nested_mlp width not divisible": (lambda: nested_mlp(6, 3, (10,), groups=4), ValueError,
                                       r"10 units.*multiple of 4"),
    "downhill negative probs": (lambda: Downhill(probs=torch.tensor([-0.1, 1.1])), ValueError,
                                r"probability vector.*logits"),
    "downhill unnormalised probs": (lambda: Downhill(probs=torch.tensor([0.2, 0.2])), ValueError,
                                    r"summing to 1"),
    "downhill zero temperature": (lambda: Downhill(probs=torch.tensor([0.5, 0.5]), temperature=0.0),
                                  ValueError, r"temperature.*> 0"),
    "truncated geometric keep 1.2": (lambda: TruncatedGeometric(1.2, 4), ValueError,
                                     r"keep_prob.*\(0, 1\)"),
    "stick breaking above 1": (lambda: StickBreakingOrdering(torch.tensor([1.5, 0.5])), ValueError,
                               r"\[0, 1\]"),
    "depth guide bad init": (lambda: DepthGuide(_small_depth(), init_logits=torch.zeros(7)),
                             ValueError, r"init_logits must have shape \[3\]"),
    "nested guide bad gumbel": (lambda: NestedGuide(_nested(), gumbel_logits="softmax"),
                                ValueError, r"'log_probs' or 'probs', got 'softmax'"),
    "nested guide bad weighting": (lambda: NestedGuide(_nested(), kl_weighting="half"),
                                   ValueError, r"'survival' or 'full', got 'half'"),
    "predict zero samples": (lambda: predict(_small_depth(), DepthGuide(_small_depth()), DIGITS_X,
                                             num_samples=0), ValueError, r"num_samples.*>= 1"),
    "predict empty": (lambda: predict(_small_depth(), DepthGuide(_small_depth()), DIGITS_X[:0]),
                      ValueError, r"empty"),
    "predict wrong shape": (lambda: predict(_small_depth(), DepthGuide(_small_depth()),
                                            torch.zeros(3, 64)), ValueError, r"\[batch, 1, 8, 8\]"),
    "predict integer inputs": (lambda: predict(_small_depth(), DepthGuide(_small_depth()),
                                               torch.zeros(3, 1, 8, 8, dtype=torch.long)),
                               TypeError, r"x\.float\(\)"),
    "datatree zero draws": (lambda: to_datatree(_small_depth(), DepthGuide(_small_depth()),
                                                DIGITS_X, torch.zeros(20).long(), num_samples=0),
                            ValueError, r"num_samples"),
    "datatree empty": (lambda: to_datatree(_small_depth(), DepthGuide(_small_depth()),
                                           DIGITS_X[:0], torch.zeros(0).long()), ValueError, r"empty"),
    "evaluate zero samples": (lambda: evaluate(_small_depth(), DepthGuide(_small_depth()),
                                               _digits(), num_samples=0), ValueError,
                              r"num_samples.*>= 1"),
    "evaluate unknown ood": (lambda: evaluate(_small_depth(), DepthGuide(_small_depth()),
                                              _digits(), ood="bogus"), ValueError, r"'bogus'"),
    "evaluate unknown score": (lambda: evaluate(_small_depth(), DepthGuide(_small_depth()),
                                                _digits(), ood_score="margin"), ValueError,
                               r"'margin'"),
    "recipe unknown method": (lambda: Recipe("bogus"), ValueError, r"'bogus'.*choose one of"),
    "recipe width zero": (lambda: Recipe("depth", width=0), ValueError, r"width=0"),
    "recipe keep_prob": (lambda: Recipe("nested", keep_prob=2.0), ValueError, r"keep_prob=2\.0"),
    "recipe weight prior": (lambda: Recipe("nested", weight_prior="laplace"), ValueError,
                            r"'laplace'.*gaussian"),
    "recipe depth prior": (lambda: Recipe("depth", prior="geometric"), ValueError,
                           r"'geometric'.*uniform or decaying"),
    "build regression nested": (lambda: build(Recipe("nested"), (10,), None), ValueError,
                                r"classification.*deterministic, depth"),
    "load unknown": (lambda: load("bogus"), ValueError, r"'bogus'.*choose one of"),
    "load val fraction": (lambda: load("digits", val_fraction=1.0), ValueError,
                          r"val_fraction.*\[0, 1\)"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_api_rejects_bad_input_with_a_clear_message(case):
    call, kind, pattern = API_CASES[case]
    with pytest.raises(kind, match=pattern):
        call()


def test_api_errors_leave_the_run_folder_untouched(tmp_path):
    model = _small_depth()
    for options in (dict(clip_grad=-1.0), dict(epochs=0), dict(lr=math.nan)):
        with pytest.raises(ValueError):
            fit(model, model.default_guide(), _digits(), out=tmp_path / "r", device="cpu",
                progress=False, **{"epochs": 1, **options})
    assert not (tmp_path / "r").exists()


def test_float64_inputs_are_converted_at_the_boundary():
    data = _digits()
    x, y = data.train.tensors
    model = _small_depth()
    fit(model, model.default_guide(), (x.double(), y), epochs=1, device="cpu", progress=False)
    pred = predict(model, model.default_guide(), x[:5].double())
    assert pred.mean.shape == (5, 10)
    assert torch.isfinite(model(x[:5].double(), y[:5]).float()).all()


# --- faults -----------------------------------------------------------------------------------

def test_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch):
    from bayesdyn.inference import checkpoint

    model = _small_depth()
    guide = model.default_guide()
    fit(model, guide, _digits(), epochs=1, out=tmp_path, device="cpu", progress=False)
    kept = (tmp_path / "checkpoint.pt").read_bytes()
    real_open = open

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk_open(path, mode="r"):
        return FullDisk(real_open(path, mode)) if "w" in mode else real_open(path, mode)

    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    with pytest.raises(OSError, match=r"no space left on the device writing .*checkpoint\.pt; "
                                      r"the previous version is kept"):
        fit(model, guide, _digits(), epochs=2, out=tmp_path, resume=True, device="cpu",
            progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == kept
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_full_disk_in_the_cli_is_one_line_and_no_crash(tmp_path, monkeypatch, capsys):
    from bayesdyn.inference import checkpoint

    def no_space(path, data):
        raise OSError(errno.ENOSPC, f"no space left on the device writing {path}; nothing was "
                                    "written. Free some space and run the command again")

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", no_space)
    import bayesdyn.runs as runs

    monkeypatch.setattr(runs, "atomic_write_bytes", no_space)
    out = tmp_path / "run"
    assert main(TRAIN + ["--epochs", "1", "--width", "16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left" in err and "Traceback" not in err


@pytest.mark.slow
def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    """A 3 MiB tmpfs: the run fails with one line, exit 2, and leaves no temporary file."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    ).returncode == 0
    if not mounted:  # a plain user cannot mount: the patched-write tests above still run
        pytest.skip("mounting a tmpfs needs root")
    try:
        (mount / "filler").write_bytes(b"\0" * 2_600_000)
        result = subprocess.run([sys.executable, "-m", "bayesdyn.cli", *TRAIN, "--epochs", "2",
                                 "--width", "64", "--out", str(mount / "run")],
                                capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert "no space left" in result.stderr and "Traceback" not in result.stderr
        assert not list((mount / "run").glob(".*tmp*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


KILL_SCRIPT = """
import sys, torch
from pathlib import Path
from bayesdyn.data import load
from bayesdyn.inference import fit
from bayesdyn.recipes import Recipe, build
out = Path(sys.argv[1])
data = load("digits")
torch.manual_seed(0)
model, guide = build(Recipe("depth", depth=2, width=16), data.input_shape, 10)
fit(model, guide, data, epochs=int(sys.argv[2]), batch_size=32, lr=3e-3, device="cpu",
    out=out, resume=(out / "checkpoint.pt").exists(), progress=False)
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    epochs, run = 6, tmp_path / "killed"
    rng = torch.Generator().manual_seed(7)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(run), str(epochs)])
        time.sleep(2.0 + 3.0 * float(torch.rand(1, generator=rng)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (run / "checkpoint.pt").exists() and load_checkpoint(run / "checkpoint.pt")["epoch"] == epochs:
            break
    subprocess.run([sys.executable, str(script), str(run), str(epochs)], check=True)
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, str(script), str(straight), str(epochs)], check=True)
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(straight / "checkpoint.pt")
    assert kills >= 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert all(torch.equal(a["guide"][k], b["guide"][k]) for k in b["guide"])
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # stale temporaries cleaned


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bayesdyn.cli", *TRAIN, "--epochs", "200",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # wait for the first epoch's checkpoint: training is under way
        if (out / "checkpoint.pt").exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err
    saved = load_checkpoint(out / "checkpoint.pt")
    assert 1 <= saved["epoch"] < 200
    code = main(TRAIN + ["--epochs", str(saved["epoch"] + 1), "--out", str(out), "--resume",
                         "--ood", "none"])
    assert code == 0, capsys.readouterr().err
