import json

import arviz as az

from bayesdyn.cli import main


def test_train_evaluate_and_resume_via_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "depth", "--dataset", "digits", "--epochs", "2", "--batch-size", "64",
            "--lr", "0.003", "--depth", "2", "--width", "16", "--device", "cpu", "--out",
            str(out), "--no-progress"]
    assert main(args) == 0
    for name in ("metrics.json", "config.json", "checkpoint.pt", "history.json", "posterior.nc",
                 "plots/reliability.png", "plots/posterior_depth.png"):
        assert (out / name).is_file(), name
    first = json.loads((out / "metrics.json").read_text())
    assert first["method"] == "depth" and len(first["budgets"]) == 3
    summary = az.summary(az.from_netcdf(out / "posterior.nc"), var_names=["depth"])
    assert "mean" in summary.columns
    assert main(args) == 2  # the run exists: refuse to overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["evaluate", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["marginal"]["accuracy"] == first["marginal"]["accuracy"]

    # 2 epochs + resume to 3 == 3 epochs straight (metrics.json the same but for the timing)
    assert main(args[:5] + ["3"] + args[6:] + ["--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(args[:5] + ["3"] + args[6:-3] + ["--out", str(straight), "--no-progress"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    direct = json.loads((straight / "metrics.json").read_text())
    for m in (resumed, direct):
        m.pop("train_seconds")
    assert resumed == direct


def test_evaluate_on_a_non_run_dir(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_nested_options_round_trip_through_the_run_directory(tmp_path):
    out = tmp_path / "nested"
    assert main(["train", "nested", "--dataset", "digits", "--epochs", "1", "--width", "32",
                 "--weight-prior", "ard", "--keep-prob", "0.9", "--device", "cpu", "--out",
                 str(out), "--no-progress", "--ood", "none"]) == 0
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["weight_prior"] == "ard" and recipe["keep_prob"] == 0.9
    first = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", str(out)]) == 0  # rebuilt from config.json: the ARD model again
    again = json.loads((out / "metrics.json").read_text())
    assert [b["flops"] for b in again["budgets"]] == [b["flops"] for b in first["budgets"]]
    assert len(first["budgets"]) == 16
