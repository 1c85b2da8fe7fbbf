"""``badexpert build``: a suspect model and clean images in, a guard bundle out."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import common
from cli.common import add_threshold_arguments, print_threshold
from defense.device import resolve_device
from defense.errors import UserError


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
    from defense.build import BuildConfig

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
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default %(default)s: CUDA when present)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_preprocessing(args, architecture: str):
    from defense.preprocessing import PRESETS, Preprocessing

    preset = args.preset or ("cifar" if architecture.startswith(("cifar_", "tiny_cnn")) else "imagenet")
    values = dict(PRESETS[preset])
    if args.input_size:
        values["input_size"] = tuple(args.input_size)
    if args.mean:
        values["mean"] = tuple(args.mean)
    if args.std:
        values["std"] = tuple(args.std)
    return Preprocessing(**values)


def check_model_outputs(model, preprocessing, num_classes: int, spec_text: str, option: str = "--model") -> None:
    import torch

    from defense.models.exported import check_dynamic_batch

    height, width = preprocessing.input_size
    probe = torch.zeros(2, 3, height, width)
    try:
        with torch.inference_mode():
            logits = model.eval()(probe)
    except Exception as error:
        raise UserError(f"{option} {spec_text}: forward pass on {height}x{width} inputs failed ({str(error).splitlines()[0]}); "
                        "check --input-size/--preset")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != num_classes:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"{option} {spec_text}: outputs {shape}, expected (batch, {num_classes}) logits; check --num-classes")
    check_dynamic_batch(model, preprocessing.input_size, f"{option} {spec_text}")


def resolve_auxiliary_method(args) -> str:
    """finetune, bcu or supplied, from --auxiliary, --auxiliary-model/--auxiliary-weights and --no-labels."""
    supplied = args.auxiliary_model is not None or args.auxiliary_weights is not None
    if supplied and args.auxiliary:
        raise UserError(f"--auxiliary {args.auxiliary}: cannot be combined with --auxiliary-model/--auxiliary-weights "
                        "(a supplied model is the auxiliary); give one or the other")
    if len(args.bcu_reinit_probabilities) < 3:
        raise UserError("--bcu-reinit-probabilities: give at least 3 values (stem, one or more stages, classifier)")
    for option in ("bcu_epochs", "bcu_batch_size"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')}: must be at least 1")
    if not args.bcu_lr > 0:
        raise UserError(f"--bcu-lr: must be positive, got {args.bcu_lr}")
    return "supplied" if supplied else args.auxiliary or "finetune"


def load_supplied_auxiliary(args, spec, preprocessing, num_classes: int):
    """The user's repaired model, which must share M's architecture: the bundle stores one."""
    from defense.manifest import sha256_of
    from defense.models import load_user_model, parse_model_spec
    from defense.models.loading import ARCHIVE_KINDS

    text = args.auxiliary_model or args.model

    def renamed(error: UserError) -> UserError:  # the loaders name --model/--weights; here they mean the auxiliary's
        return UserError(str(error).replace("--weights", "--auxiliary-weights").replace("--model", "--auxiliary-model"))

    try:
        auxiliary_spec = parse_model_spec(text, num_classes)
    except UserError as error:
        raise renamed(error) from None
    archive = auxiliary_spec.kind == spec.kind and spec.kind in ARCHIVE_KINDS  # TorchScript or .pt2: any file
    same = archive or (auxiliary_spec.kind, auxiliary_spec.name) == (spec.kind, spec.name)
    if not same:
        raise UserError(f"--auxiliary-model {text}: not the architecture of --model {args.model}; the bundle stores one "
                        "architecture, so bring a repaired copy of the same model (or use --auxiliary bcu)")
    try:
        auxiliary = load_user_model(auxiliary_spec if archive else spec, args.auxiliary_weights)
    except UserError as error:
        raise renamed(error) from None
    check_model_outputs(auxiliary, preprocessing, num_classes, text, option="--auxiliary-model")
    source = {"spec": auxiliary_spec.to_dict()}
    if args.auxiliary_weights is not None:
        source.update(weights=args.auxiliary_weights.name, weights_sha256=sha256_of(args.auxiliary_weights))
    return auxiliary, source


def run_build(args) -> int:
    import torch

    from defense.build import BuildConfig, build_guard
    from defense.calibrate import file_digest
    from defense.bundle import save_bundle
    from defense.bundle_trust import load_signing_key
    from defense.data import load_image_folder, read_class_names, scan_flat_folder
    from defense.models import load_user_model, parse_model_spec

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {args.out}: the folder exists and is not empty; choose another or pass --overwrite")
    sign_key = load_signing_key(args.sign_key) if args.sign_key else None  # a bad key fails before training
    device = resolve_device(args.device)
    auxiliary_method = resolve_auxiliary_method(args)
    preprocessing = resolve_preprocessing(args, args.model)
    class_names = read_class_names(args.class_names) if args.class_names else None
    clean = load_image_folder(args.clean_data, preprocessing, class_names, labeled=not args.no_labels,
                              progress=not args.quiet)
    num_classes = args.num_classes or (len(clean.class_names) if clean.class_names else None)
    if num_classes is None:
        raise UserError("--num-classes is required with --no-labels (or give --class-names)")
    if clean.class_names and len(clean.class_names) != num_classes:
        raise UserError(f"--num-classes {num_classes}: the clean folder has {len(clean.class_names)} classes; "
                        "give --class-names listing all the model's classes in output order")
    spec = parse_model_spec(args.model, num_classes)
    model = load_user_model(spec, args.weights)
    check_model_outputs(model, preprocessing, num_classes, args.model)
    supplied, supplied_source = (load_supplied_auxiliary(args, spec, preprocessing, num_classes)
                                 if auxiliary_method == "supplied" else (None, None))
    config = BuildConfig(
        calibration_fraction=args.calibration_fraction, selection_fraction=args.selection_fraction, fpr=args.fpr, threshold_rule=args.threshold_rule,
        threshold_delta=args.threshold_delta, alpha=args.alpha, seed=args.seed, unlearn_lr=args.unlearn_lr,
        unlearn_epochs=args.unlearn_epochs, unlearn_batch_size=args.unlearn_batch_size,
        unlearn_target_ratio=args.unlearn_target_ratio, expert_labels=args.expert_labels,
        expert_labels_seed=args.expert_labels_seed, finetune_lr=args.finetune_lr,
        finetune_epochs=args.finetune_epochs, finetune_batch_size=args.finetune_batch_size,
        finetune_milestones=tuple(args.finetune_milestones), finetune_momentum=args.finetune_momentum,
        finetune_weight_decay=args.finetune_weight_decay, finetune_recover_ratio=args.finetune_recover_ratio,
        min_early_dip=args.min_early_dip, pseudo_label_agreement_goal=args.pseudo_label_agreement,
        augment=not args.no_augment, labels=not args.no_labels, device=device, progress=not args.quiet,
        auxiliary=auxiliary_method, bcu_epochs=args.bcu_epochs, bcu_lr=args.bcu_lr, bcu_batch_size=args.bcu_batch_size,
        bcu_momentum=args.bcu_momentum, bcu_weight_decay=args.bcu_weight_decay,
        bcu_reinit_probabilities=tuple(args.bcu_reinit_probabilities),
    )
    if not clean.class_names:
        clean.class_names = [str(i) for i in range(num_classes)]
    calibration_paths = None
    if args.calibration_data is not None:
        calibration_paths = scan_flat_folder(args.calibration_data, option="--calibration-data")
        labeled = {file_digest(path) for path in clean.paths}
        shared = [path for path in calibration_paths if file_digest(path) in labeled]  # by content: copies too
        if shared:
            raise UserError(f"--calibration-data {args.calibration_data}: {len(shared)} of its images are also in "
                            f"--clean-data (by content, e.g. {shared[0]}); the threshold must be set on images that "
                            "neither finetuning nor the rate choices saw: give a separate folder")
    torch.manual_seed(args.seed)
    result = build_guard(model, clean, preprocessing, num_classes, config, auxiliary_model=supplied,
                         calibration_paths=calibration_paths)
    if supplied_source:
        result.manifest_fields["auxiliary_model"]["source"] = supplied_source
    manifest = save_bundle(args.out, result.guard, spec, result.manifest_fields, overwrite=args.overwrite,
                           sign_key=sign_key)
    print_build_summary(manifest, args.out)
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
    print_threshold(manifest)
    print(f"  build took {manifest.build_seconds:.0f} s")
    print(f"next: badexpert serve {out}")
