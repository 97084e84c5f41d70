import subprocess
import sys

import pytest

import bayesdyn
from bayesdyn.cli import main


def test_import_and_version():
    import importlib

    assert bayesdyn.__version__
    for sub in ("data", "distributions", "nn", "models", "guides", "inference", "evaluation"):
        importlib.import_module(f"bayesdyn.{sub}")


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "bayesdyn.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("train", "evaluate", "calibrate", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["train", "evaluate", "calibrate", "demo", "continual"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    if command == "train":
        for option in ("--dataset", "--data-root", "--download", "--epochs", "--batch-size",
                       "--device", "--seed", "--out", "--resume"):
            assert option in text


def test_unknown_method_and_dataset_are_clear_errors(tmp_path, capsys):
    assert main(["train", "bogus", "--dataset", "digits", "--out", str(tmp_path / "a")]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert main(["train", "depth", "--dataset", "bogus", "--out", str(tmp_path / "b")]) == 2
    assert "unknown dataset 'bogus'" in capsys.readouterr().err
    assert main(["train", "structured-ensemble", "--dataset", "digits", "--prune", "1.5",
                 "--out", str(tmp_path / "c")]) == 2
    assert "prune" in capsys.readouterr().err
    assert main(["continual", "subnets", "--dataset", "digits", "--epochs", "0",
                 "--out", str(tmp_path / "d")]) == 2
    assert "epochs" in capsys.readouterr().err


def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "depth", "--dataset", "digits", "--device", "cuda",
                 "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_trains_every_family_and_calibrates_the_exits(tmp_path, capsys):
    """The README's first command, at one epoch: every built method in one table, then the
    post-hoc calibration of the boosted exits."""
    from bayesdyn import recipes

    assert main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table, calibration = out.split("Bayesian last layers")
    assert {line.split()[0] for line in table.splitlines()[2:] if line.strip()} == \
        set(recipes.IMPLEMENTED)
    assert all(name in calibration for name in ("vanilla", "temperature", "laplace+mie"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(recipes.IMPLEMENTED)
