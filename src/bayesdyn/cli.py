"""The ``bayesdyn`` command: ``train``, ``evaluate``, ``calibrate``, ``demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import recipes

TRAIN_DEFAULTS = {"epochs": 10, "batch_size": 128, "lr": 1e-3}


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .inference.parallel import init_from_environment

    joined = init_from_environment()  # under torchrun: one process of the group
    try:
        return args.handler(args)
    except KeyboardInterrupt as stop:  # fit saved the state: one line, no traceback
        saved = f" ({stop})" if str(stop) else ""
        print(f"bayesdyn {args.command}: interrupted{saved}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, NotImplementedError, RuntimeError) as err:
        print(f"bayesdyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesdyn",
        description="Bayesian dynamic neural networks: train, evaluate and compare networks whose "
                    "depth, width, exit or sub-network is a latent variable.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a method and write a run directory",
                           description="Train METHOD on a dataset; writes metrics.json, "
                                       "config.json, checkpoint.pt, plots/ and posterior.nc to --out.")
    train.add_argument("method", metavar="METHOD",
                       help=f"one of {', '.join(recipes.IMPLEMENTED)}")
    train.add_argument("--dataset", required=True, help="digits, fashion-mnist, mnist, kmnist, "
                       "cifar10, cifar100, svhn; regression: diabetes, toy-1d")
    train.add_argument("--data-root", default=None, help="folder holding the dataset files")
    train.add_argument("--download", action="store_true",
                       help="let torchvision download the dataset (needs a network)")
    train.add_argument("--epochs", type=int, default=TRAIN_DEFAULTS["epochs"],
                       help="total epochs (with --resume: continue up to this many)")
    train.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    train.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"], help="Adam learning rate")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default=None, help="run directory (default runs/METHOD-DATASET-sSEED)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--arch", default="auto", choices=("auto", *recipes.ARCHS),
                       help="backbone: residual MLP, VDS conv net, ResNet-18-like or DUN's "
                            "ResNet-50 (auto: mlp for 8x8 inputs, conv otherwise); for exits "
                            "and boosted-exits: mlp, msdnet (BoostNet's CIFAR MSDNet) or resnet "
                            "(auto: mlp for 8x8 inputs, msdnet otherwise)")
    train.add_argument("--depth", type=int, default=4, help="residual blocks (mlp, conv)")
    train.add_argument("--width", type=int, default=64, help="hidden units / channels")
    train.add_argument("--prior", default="uniform", choices=("uniform", "decaying"),
                       help="depth prior of the depth method")
    train.add_argument("--keep-prob", type=float, default=0.95,
                       help="nested: keep probability of the truncated-geometric ordering prior")
    train.add_argument("--weight-prior", default="gaussian", choices=("gaussian", "log-uniform", "ard"),
                       help="nested: prior over the weights (log-uniform: BNNN's sparsity prior)")
    train.add_argument("--exits", type=int, default=4,
                       help="exits, boosted-exits: number of exits (msdnet blocks, mlp layers; "
                            "resnet: spread over its 3 stages of --depth blocks)")
    train.add_argument("--gamma", type=float, default=0.5,
                       help="boosted-exits: weight of the previous exits' ensemble, "
                            "F_k = f_k + gamma F_(k-1) (BoostNet: 0.5)")
    train.add_argument("--gradient-equilibrium", action=argparse.BooleanOptionalAction,
                       default=None, help="exits, boosted-exits: rescale the gradients between "
                                          "exits and later blocks (default: on for "
                                          "boosted-exits, off for exits)")
    train.add_argument("--stop-gradient", action=argparse.BooleanOptionalAction, default=True,
                       help="boosted-exits: exit k's loss does not train the earlier exits "
                            "through its history")
    ens = train.add_argument_group("ensembles (structured-ensemble, ensemble; arch mlp or conv)")
    ens.add_argument("--members", type=int, default=3, help="ensemble members M")
    ens.add_argument("--prune", type=float, default=0.5,
                     help="structured-ensemble: fraction q of the channels pruned per member")
    ens.add_argument("--prune-scope", default="global", choices=("global", "local"),
                     help="structured-ensemble: one ranking over all layers, or per layer "
                          "(local: equal widths, so all members run in one pass)")
    ens.add_argument("--divergence", default="gaussian", choices=("gaussian", "official"),
                     help="structured-ensemble: MMD between members' masks (official: the "
                          "released code's formula, can be negative)")
    ens.add_argument("--divergence-weight", type=float, default=0.01,
                     help="structured-ensemble: w in CE + w / (sum of MMDs) (0: off)")
    ens.add_argument("--mask-epochs", type=int, default=10,
                     help="structured-ensemble: epochs of the mask stage")
    ens.add_argument("--combine", default="probs", choices=("probs", "logits"),
                     help="ensembles: average the members' probabilities or their logits")
    train.add_argument("--ood", default="default",
                       help="OOD set for evaluation ('default' per dataset, 'none' to skip)")
    train.add_argument("--num-samples", type=int, default=8,
                       help="Monte Carlo draws per input in evaluation (their FLOPs are reported)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    opt = train.add_argument_group("optimisation (see bayesdyn.inference.FitConfig)")
    opt.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"))
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    opt.add_argument("--weight-decay", type=float, default=0.0,
                     help="on point-estimate weights only, never on variational parameters")
    opt.add_argument("--schedule", default="none", choices=("none", "cosine", "multistep"),
                     help="learning-rate schedule (multistep: x0.1 at 50%% and 75%% of epochs)")
    opt.add_argument("--warmup-epochs", type=int, default=0,
                     help="epochs with the structure posterior (q(d), q(z)) held at its start")
    opt.add_argument("--clip-grad", type=float, default=None, help="maximal gradient norm")
    opt.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                     help="stop when validation NLL has not improved for PATIENCE epochs")
    opt.add_argument("--crop-padding", type=int, default=0, metavar="PIXELS",
                     help="augmentation: random crop after zero padding (images)")
    opt.add_argument("--hflip", action="store_true", help="augmentation: random horizontal flip")
    scale = train.add_argument_group("scale (see README: Train on several GPUs or machines)")
    scale.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                       help="mixed precision (likelihoods and KLs stay in fp32)")
    scale.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format for conv nets")
    scale.add_argument("--streaming", default="auto", choices=("auto", "always", "never"),
                       help="stream batches from host memory (auto: when the data would take "
                            "over a quarter of the free GPU memory)")
    scale.add_argument("--num-workers", type=int, default=0, help="DataLoader workers when streaming")
    scale.add_argument("--sync-batchnorm", action="store_true",
                       help="under torchrun: BatchNorm statistics over all processes")
    scale.add_argument("--compile", action="store_true", help="torch.compile the objective")
    train.set_defaults(handler=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a run directory again",
                        description="Rebuild the model of a run directory from config.json and "
                                    "its checkpoint, evaluate it, rewrite metrics.json and plots.")
    ev.add_argument("run_dir", metavar="DIR")
    ev.add_argument("--ood", default=None, help="OOD set (default: the one used in training)")
    ev.add_argument("--num-samples", type=int, default=None,
                    help="Monte Carlo draws per input (default: the run's)")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(handler=cmd_evaluate)

    cl = sub.add_parser("continual", help="task-incremental continual learning with "
                                          "structured sub-networks",
                        description="Split the dataset into tasks of two classes and train them "
                                    "in turn; writes metrics.json (task accuracy matrix, average "
                                    "accuracy, backward transfer, parameters after each task).")
    cl.add_argument("method", metavar="METHOD", choices=("subnets", "finetune", "separate"),
                    help="subnets (channels per task, earlier ones frozen), finetune (one "
                         "network trained on each task in turn) or separate (one per task)")
    cl.add_argument("--dataset", default="fashion-mnist")
    cl.add_argument("--data-root", default=None)
    cl.add_argument("--epochs", type=int, default=10, help="epochs per task")
    cl.add_argument("--prune", type=float, default=0.5,
                    help="subnets: fraction of the free channels a task leaves free")
    cl.add_argument("--mask-epochs", type=int, default=2, help="subnets: mask-stage epochs")
    cl.add_argument("--width", type=int, default=256)
    cl.add_argument("--depth", type=int, default=2)
    cl.add_argument("--batch-size", type=int, default=128)
    cl.add_argument("--lr", type=float, default=1e-3)
    cl.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE")
    cl.add_argument("--train-subset", type=int, default=None,
                    help="train on this many training examples (all tasks together)")
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--device", default="cpu")
    cl.add_argument("--out", default=None, help="default runs/continual-METHOD-DATASET-sSEED")
    cl.set_defaults(handler=cmd_continual)
    add_calibrate_parser(sub)

    demo = sub.add_parser("demo", help="train every implemented family on digits (CPU, minutes) "
                                       "and print one comparison table")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--out", default="runs/demo", help="parent folder of the demo runs")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(handler=cmd_demo)
    return parser


def cmd_train(args) -> int:
    from .runs import train_run

    out = Path(args.out or f"runs/{args.method}-{args.dataset}-s{args.seed}")
    recipe = recipes.Recipe(args.method, arch=args.arch, depth=args.depth, width=args.width,
                            prior=args.prior, keep_prob=args.keep_prob,
                            weight_prior=args.weight_prior, exits=args.exits, gamma=args.gamma,
                            gradient_equilibrium=args.gradient_equilibrium,
                            stop_gradient=args.stop_gradient, members=args.members,
                            prune=args.prune, prune_scope=args.prune_scope,
                            divergence=args.divergence,
                            divergence_weight=args.divergence_weight,
                            mask_epochs=args.mask_epochs, combine=args.combine)
    fit_options = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       optimizer=args.optimizer, momentum=args.momentum,
                       weight_decay=args.weight_decay,
                       schedule=None if args.schedule == "none" else args.schedule,
                       warmup_epochs=args.warmup_epochs, clip_grad=args.clip_grad,
                       early_stopping=args.early_stopping, crop_padding=args.crop_padding,
                       hflip=args.hflip, precision=args.precision,
                       channels_last=args.channels_last, streaming=args.streaming,
                       num_workers=args.num_workers, sync_batchnorm=args.sync_batchnorm,
                       compile=args.compile)
    metrics = train_run(recipe, dataset=args.dataset, out=out, data_root=args.data_root,
                        download=args.download, device=args.device, seed=args.seed,
                        resume=args.resume, ood=None if args.ood == "none" else args.ood,
                        progress=False if args.no_progress else None,
                        num_samples=args.num_samples, **fit_options)
    if metrics is not None:  # under torchrun, the process that evaluated
        print(format_table([metrics]))
        print(f"run directory: {out}")
    return 0


def cmd_continual(args) -> int:
    from .ensemble_recipes import continual_run

    out = Path(args.out or f"runs/continual-{args.method}-{args.dataset}-s{args.seed}")
    result = continual_run(args.dataset, args.method, out, data_root=args.data_root,
                           seed=args.seed, epochs=args.epochs, prune=args.prune,
                           mask_epochs=args.mask_epochs, width=args.width, depth=args.depth,
                           batch_size=args.batch_size, lr=args.lr,
                           early_stopping=args.early_stopping, train_subset=args.train_subset,
                           device=args.device)
    print("accuracy matrix (row i: after task i; column j: task j)")
    for row in result["accuracy_matrix"]:
        print("  " + " ".join(f"{v:.3f}" for v in row))
    print(f"average accuracy {result['average_accuracy']:.4f}, backward transfer "
          f"{result['backward_transfer']:+.4f}, parameters {result['parameters']}")
    print(f"run directory: {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .runs import evaluate_run

    metrics = evaluate_run(Path(args.run_dir), ood=args.ood, num_samples=args.num_samples,
                           device=args.device)
    print(format_table([metrics]))
    return 0


def add_calibrate_parser(sub) -> None:
    cal = sub.add_parser("calibrate", help="post-hoc Laplace / temperature / MIE on an exits run",
                         description="Calibrate the exits of a trained exits or boosted-exits run: "
                                     "vanilla, temperature scaling, last-layer Laplace on every "
                                     "exit (--laplace), MIE (--mie) and LA+MIE side by side; "
                                     "writes RUN/calibration/metrics.json and plots.")
    cal.add_argument("run_dir", metavar="RUN")
    cal.add_argument("--laplace", default="kron",
                     help="structure of every head's Laplace: kron (K-FAC, default), diag, full, "
                          "kron-paper (the WACV code's variant) or none")
    cal.add_argument("--mie", action="store_true", help="add model-internal ensembling (MIE)")
    cal.add_argument("--prior", default="marglik", choices=["marglik", "grid"],
                     help="prior precision: exact marginal likelihood, or the paper's grid on "
                          "validation NLL (jointly with a temperature grid)")
    cal.add_argument("--link", default="probit", choices=["probit", "bridge", "mc"])
    cal.add_argument("--num-samples", type=int, default=100, help="draws of the mc link")
    cal.add_argument("--device", default="cpu")
    cal.set_defaults(handler=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_run, format_calibration

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    laplace = None if args.laplace == "none" else args.laplace
    metrics = calibrate_run(Path(args.run_dir), laplace=laplace, mie=args.mie, prior=args.prior,
                            link=args.link, num_samples=args.num_samples, device=args.device)
    print(format_calibration(metrics))
    print(f"written: {Path(args.run_dir) / 'calibration'}")
    return 0


def cmd_demo(args) -> int:
    from .runs import train_run

    started, results = time.perf_counter(), []
    for method in recipes.IMPLEMENTED:
        recipe = recipes.Recipe(method, depth=4, width=64)
        out = Path(args.out) / method
        results.append(train_run(recipe, dataset="digits", out=out, epochs=args.epochs,
                                 batch_size=64, lr=3e-3, device=args.device, seed=0,
                                 progress=False))
    from .calibrate import calibrate_run, format_calibration

    calibration = calibrate_run(Path(args.out) / "boosted-exits", laplace="kron", mie=True,
                                device=args.device)
    print(format_table(results))
    print("\nboosted-exits with Bayesian last layers, post hoc (`bayesdyn calibrate RUN`): last "
          "exit and mean over the budgeted-batch levels")
    print(format_calibration(calibration))
    print(f"demo: {len(results)} methods trained on digits and the exits calibrated in "
          f"{time.perf_counter() - started:.0f} s; run directories under {args.out}")
    return 0


def format_table(results: list[dict], max_budgets: int = 6) -> str:
    """One row per (method, budget) and the marginalised model (regression: RMSE, the exact
    mixture NLL and the moment-matched Gaussian NLL)."""
    regression = all(r.get("task") == "regression" for r in results)
    columns = (("rmse", "RMSE"), ("nll", "NLL"), ("nll_gaussian", "NLL Gauss")) if regression \
        else (("accuracy", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("ood_auroc", "OOD AUROC"))
    head = f"{'method':<19} {'budget':<10} {'kFLOPs':>9} " + " ".join(f"{t:>10}" for _, t in columns)
    lines = [head, "-" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in results:
        budgets = r["budgets"]
        if len(budgets) > max_budgets:  # evenly spaced budgets; metrics.json has all of them
            keep = sorted({round(j * (len(budgets) - 1) / (max_budgets - 1)) for j in range(max_budgets)})
            budgets = [budgets[i] for i in keep]
        rows = [("marginal", r["marginal"])] if len(r["budgets"]) > 1 else []
        rows += [(b["budget"], b) for b in budgets]
        for name, m in rows:
            lines.append(f"{r['method']:<19} {name:<10} {m['flops'] / 1e3:>9.1f} "
                         + " ".join(f"{fmt(m.get(key)):>10}" for key, _ in columns))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
