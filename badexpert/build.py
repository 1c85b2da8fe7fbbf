"""``badexpert build``: a suspect model and clean images in, a guard bundle out.

Argument parsing and printing only: :meth:`defense.Bundle.build` does the work, with the same defaults and
errors (tests/test_layout.py holds this module to that).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from badexpert import common
from badexpert.common import add_threshold_arguments, print_threshold


def add_parser(commands) -> None:
    build = commands.add_parser("build", help="the offline job: model + clean images -> guard bundle",
                                description="Build a BaDExpert guard bundle: backdoor expert, auxiliary model and a "
                                            "calibrated rejection threshold, from a suspect model and clean images.")
    add_build_arguments(build)
    build.set_defaults(handler=run_build)


def build_command_parser() -> argparse.ArgumentParser:
    """A ``badexpert`` parser that knows only ``build`` (what the demo runs)."""
    parser = argparse.ArgumentParser(prog="badexpert")
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("preprocessing (stored in the bundle; evaluate and serve reuse it)")
    group.add_argument("--preset", choices=["cifar", "imagenet", "none"],
                       help="input size and normalization convention (default: cifar for cifar_* and tiny_cnn "
                            "architectures, imagenet otherwise)")
    group.add_argument("--input-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="overrides the preset")
    group.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="overrides the preset")
    group.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="overrides the preset")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    from defense.build import CANARY_KINDS, FINETUNE_RECIPES, BuildConfig

    defaults = BuildConfig()
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--model", required=True, metavar="SPEC",
                    help="architecture name (cifar_resnet18, resnet18, vgg16_bn, ...: see 'badexpert models'), "
                         "'package.module:factory' on PYTHONPATH, a TorchScript file, or a torch.export .pt2 file")
    io.add_argument("--weights", type=Path, metavar="FILE",
                    help="weights: .safetensors, or a PyTorch state dict (.pt/.pth, read with weights_only=True)")
    io.add_argument("--num-classes", type=int, help="outputs of the model (default: the number of class folders)")
    io.add_argument("--clean-data", type=Path, required=True, metavar="DIR",
                    help="reserved clean images: one sub-folder per class (ImageFolder), or a flat folder with --no-labels")
    io.add_argument("--calibration-data", type=Path, metavar="DIR",
                    help="a separate folder of clean images (flat or one sub-folder per class; labels ignored) that "
                         "sets the threshold alone: then every --clean-data image goes to finetuning and rate "
                         "choices. 2,000+ images make the realized FPR close to the target (see 'calibrate')")
    io.add_argument("--class-names", type=Path, metavar="FILE",
                    help="one class name per line, in the model's output order (default: sorted folder names)")
    io.add_argument("--no-labels", action="store_true",
                    help="the clean images carry no labels: M's own predictions stand in for them")
    io.add_argument("--out", type=Path, required=True, metavar="DIR", help="bundle folder to write")
    io.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    io.add_argument("--sign-key", type=Path, metavar="PEM",
                    help="sign the bundle with this Ed25519 private key (PEM); serve --verify-key checks it")
    add_preprocessing_arguments(parser)
    method = parser.add_argument_group("method (defaults are the paper's)")
    add_threshold_arguments(method, defaults)
    method.add_argument("--calibration-fraction", type=common.fraction, default=defaults.calibration_fraction,
                        help="share of the --clean-data images held out to set the threshold, when no "
                             "--calibration-data is given (default %(default)s)")
    method.add_argument("--selection-fraction", type=common.fraction, default=defaults.selection_fraction,
                        help="share of the --clean-data images held out to choose the learning rates "
                             "(default %(default)s)")
    method.add_argument("--alpha", type=common.alpha, default=defaults.alpha,
                        help="score parameter alpha, in (0, 1] (default %(default)s)")
    method.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split and the finetunings (default %(default)s)")
    method.add_argument("--unlearn-lr", type=common.learning_rate, default=None, metavar="auto|LR",
                        help="backdoor expert's Adam learning rate; auto picks the smallest rate at which its "
                             "D_select accuracy falls to --unlearn-target-ratio of M's (default auto)")
    method.add_argument("--expert-labels", choices=("shift", "derangement"), default=defaults.expert_labels,
                        help="the backdoor expert's wrong labels: shift (y + 1 mod C, the paper's) or derangement "
                             "(a random permutation without fixed points, drawn at random and recorded in the "
                             "bundle, so an attacker cannot know it) (default %(default)s)")
    method.add_argument("--expert-labels-seed", type=int, default=None, metavar="N",
                        help="--expert-labels derangement: draw the permutation from this seed instead of at "
                             "random (for a reproducible build; anyone who knows N knows the mapping)")
    method.add_argument("--unlearn-target-ratio", type=common.fraction, default=defaults.unlearn_target_ratio,
                        help="(default %(default)s)")
    method.add_argument("--unlearn-epochs", type=int, default=defaults.unlearn_epochs, help="(default %(default)s)")
    method.add_argument("--unlearn-batch-size", type=int, default=defaults.unlearn_batch_size, help="(default %(default)s)")
    method.add_argument("--finetune-lr", type=common.learning_rate, default=None, metavar="auto|LR",
                        help="auxiliary model's SGD learning rate; auto tries 0.1 downwards and keeps the first "
                             "rate that stays finite and recovers --finetune-recover-ratio of M's accuracy (default auto)")
    method.add_argument("--finetune-recipe", choices=list(FINETUNE_RECIPES), default=defaults.finetune_recipe,
                        help="how clean finetuning moves M (docs/method.md, section 3): plain (the paper's), warmup "
                             "(rate warm-up over the first epoch and gradient clipping: larger rates stay stable on "
                             "models without BatchNorm) or fresh_head (the classifier layer re-initialized first); "
                             "--self-test choose may pick another (default %(default)s)")
    method.add_argument("--finetune-recover-ratio", type=common.fraction, default=defaults.finetune_recover_ratio,
                        help="--finetune-lr auto: the largest rate whose M' keeps this share of M's D_select accuracy "
                             "(default %(default)s)")
    method.add_argument("--min-early-dip", type=common.fraction, default=defaults.min_early_dip,
                        help="warn when the auxiliary loses less than this share of M's D_select accuracy in its first "
                             "epochs (before the first milestone): a sign that it kept the backdoor (default %(default)s)")
    method.add_argument("--pseudo-label-agreement", type=common.fraction, default=defaults.pseudo_label_agreement_goal,
                        help="--no-labels with --finetune-lr auto: the largest rate whose M' agrees with M on this "
                             "share of D_select (default %(default)s)")
    method.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs, help="(default %(default)s)")
    method.add_argument("--finetune-batch-size", type=int, default=defaults.finetune_batch_size, help="(default %(default)s)")
    method.add_argument("--finetune-milestones", type=int, nargs="+", default=list(defaults.finetune_milestones),
                        help="epochs at which the rate is divided by 10 (default %(default)s)")
    method.add_argument("--finetune-momentum", type=float, default=defaults.finetune_momentum, help="(default %(default)s)")
    method.add_argument("--finetune-weight-decay", type=float, default=defaults.finetune_weight_decay, help="(default %(default)s)")
    method.add_argument("--no-augment", action="store_true", help="no random crop and flip in clean finetuning and BCU")
    auxiliary = parser.add_argument_group("auxiliary model M' (default: finetune; with --no-labels on M's predicted labels)")
    auxiliary.add_argument("--auxiliary", choices=["finetune", "bcu"],
                           help="finetune: clean finetuning on the reserved images (with --no-labels: on M's own "
                                "predicted labels, which carry no trigger); bcu: BCU's layer-wise re-initialization "
                                "and distillation from M, needs no labels")
    auxiliary.add_argument("--auxiliary-model", metavar="SPEC",
                           help="bring your own repaired model (NAD, ANP, I-BAU, ...) as M', given like --model; "
                                "it must be the same architecture (default: --model's)")
    auxiliary.add_argument("--auxiliary-weights", type=Path, metavar="FILE", help="the repaired model's weights, like --weights")
    auxiliary.add_argument("--bcu-epochs", type=int, default=defaults.bcu_epochs, help="(default %(default)s)")
    auxiliary.add_argument("--bcu-lr", type=float, default=defaults.bcu_lr,
                           help="SGD rate, cosine schedule; divided by up to ~30 if training diverges (default %(default)s)")
    auxiliary.add_argument("--bcu-batch-size", type=int, default=defaults.bcu_batch_size, help="(default %(default)s)")
    auxiliary.add_argument("--bcu-momentum", type=float, default=defaults.bcu_momentum, help="(default %(default)s)")
    auxiliary.add_argument("--bcu-weight-decay", type=float, default=defaults.bcu_weight_decay, help="(default %(default)s)")
    auxiliary.add_argument("--bcu-reinit-probabilities", type=common.probability, nargs="+", metavar="P",
                           default=list(defaults.bcu_reinit_probabilities),
                           help="re-initialization probability of the stem, each depth stage, and the classifier "
                                "(conv/linear layers in order; default %(default)s)")
    signals = parser.add_argument_group("signals (docs/method.md, section 8)")
    signals.add_argument("--signals", choices=["expert", "features", "fused"], default=defaults.signals,
                         help="what decides: expert (the paper's score alone), features (the feature signal: distances "
                              "of M's hidden activations to the clean images of the predicted class) or fused (the "
                              "more suspect of the two, under one calibrated threshold; default %(default)s)")
    signals.add_argument("--feature-stages", type=int, default=defaults.feature_stages, metavar="N",
                         help="the feature signal reads the ends of M's last N resolutions and the classifier's "
                              "input (default %(default)s)")
    self_test = parser.add_argument_group("self-test (docs/method.md, section 9)")
    self_test.add_argument("--self-test", choices=["off", "report", "choose"], default=defaults.self_test,
                           help="report: implant secret canary backdoors in a copy of the model, run the guard procedure "
                                "on it and report how well it catches them (AUROC, share passing at tau); choose: also "
                                "pick the unlearning rate that catches them best; off: neither (default %(default)s)")
    self_test.add_argument("--canary-seed", type=int, default=None, metavar="N",
                           help="draw the canaries from this seed instead of at random (a reproducible build; anyone "
                                "who knows N knows the canaries)")
    self_test.add_argument("--canaries", dest="canary_kinds", nargs="+", choices=list(CANARY_KINDS),
                           default=list(defaults.canary_kinds), metavar="KIND",
                           help=f"the canary backdoors implanted, one of each kind: patch (a random square), blend (a "
                                "random pattern at 20%% opacity), warp (a smooth random warp of the whole image, "
                                f"WaNet's shape) (default: {' '.join(defaults.canary_kinds)})")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default %(default)s: CUDA when present)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


# Bundle.build()'s keywords that are the command's options under the same name; every other BuildConfig
# field that the command has an option for goes through as well (defense.build_inputs.build_config).
INPUT_OPTIONS = ("weights", "num_classes", "class_names", "calibration_data", "preset", "input_size", "mean", "std",
                 "auxiliary", "auxiliary_model", "auxiliary_weights", "sign_key", "overwrite", "device")


def build_options(args: argparse.Namespace) -> dict:
    """:meth:`defense.Bundle.build`'s keyword arguments from the parsed options: the same names, a few
    flags inverted (--no-labels, --no-augment, --quiet) or shortened (--pseudo-label-agreement)."""
    from defense.build import BuildConfig

    given = vars(args)
    settings = {field.name: given[field.name] for field in dataclasses.fields(BuildConfig)
                if field.name in given and field.name not in INPUT_OPTIONS}
    return {**{name: given[name] for name in INPUT_OPTIONS}, **settings,
            "pseudo_label_agreement_goal": args.pseudo_label_agreement, "augment": not args.no_augment,
            "labels": not args.no_labels, "progress": not args.quiet}


def run_build(args: argparse.Namespace) -> int:
    from defense.guard_bundle import Bundle

    bundle = Bundle.build(args.model, args.clean_data, out=args.out, **build_options(args))
    print_build_summary(bundle.manifest, args.out)
    return 0


def print_build_summary(manifest, out: Path) -> None:
    accuracy = manifest.accuracy_on_selection
    print()
    print(f"bundle {manifest.bundle_id} written to {out}")
    print(f"  D_select accuracy: model {accuracy['model']:.3f}, backdoor expert {accuracy['backdoor_expert']:.3f}, "
          f"auxiliary {accuracy['auxiliary_model']:.3f}")
    auxiliary = manifest.auxiliary_model
    print(f"  unlearning lr {manifest.backdoor_expert['lr']:g} ({manifest.backdoor_expert['chosen_by']}), auxiliary: "
          f"{auxiliary['method']}" + (f" lr {auxiliary['lr']:g} ({auxiliary['chosen_by']})" if "lr" in auxiliary else ""))
    feature = (manifest.model_extra or {}).get("feature_signal")
    if feature:
        print(f"  signals: {feature['signals']} (feature layers: {', '.join(feature['layers'])})")
    else:
        print("  signals: expert (the feature signal is off)")
    print_threshold(manifest)
    common.print_self_test(manifest)
    print(f"  build took {manifest.build_seconds:.0f} s")
    print(f"next: badexpert serve {out}")
