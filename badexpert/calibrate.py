"""``badexpert calibrate``: a new bundle with the same models and a threshold set on more clean images."""

from __future__ import annotations

from pathlib import Path

from badexpert.common import add_factory_modules_argument, add_threshold_arguments, print_threshold
from defense.device import resolve_device


def add_parser(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="re-set a bundle's threshold from more clean images (no labels, no retraining)",
        description="Score a folder of clean images with a bundle's three models and write a new bundle whose "
                    "threshold rejects the target share of them: same models, new tau, a new bundle id, and the "
                    "calibration record in its manifest. The images need no labels (a flat folder, or one "
                    "sub-folder per class) but must be clean and unseen by the build (images whose content "
                    "the build finetuned or chose rates on are refused): 2,000+ bring the realized false-positive "
                    "rate close to the target. The target FPR and rule stay the bundle's unless given.")
    calibrate.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle to recalibrate (left unchanged)")
    calibrate.add_argument("--clean", type=Path, required=True, metavar="DIR", help="clean images, labels ignored")
    calibrate.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new bundle's folder")
    calibrate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    calibrate.add_argument("--verify-key", type=Path, metavar="PEM",
                           help="refuse BUNDLE unless it is signed with this Ed25519 public key's private key")
    calibrate.add_argument("--sign-key", type=Path, metavar="PEM",
                           help="sign the new bundle with this Ed25519 private key (PEM); serve --verify-key checks it")
    add_factory_modules_argument(calibrate)
    add_threshold_arguments(calibrate.add_argument_group("threshold (default: as the bundle was calibrated)"))
    calibrate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")
    calibrate.set_defaults(handler=run_calibrate)


def run_calibrate(args) -> int:
    from defense.bundle_trust import load_signing_key
    from defense.calibrate import recalibrate

    sign_key = load_signing_key(args.sign_key) if args.sign_key else None  # a bad key fails before scoring
    allowed = [module for module in args.allow_factory_modules.split(",") if module]
    manifest, _ = recalibrate(args.bundle, args.clean, args.out, args.fpr, args.threshold_rule, args.threshold_delta,
                              device=resolve_device(args.device), progress=not args.quiet, overwrite=args.overwrite,
                              verify_key=args.verify_key, sign_key=sign_key, allowed_factory_modules=allowed)
    print()
    print(f"bundle {manifest.bundle_id} written to {args.out} (recalibrated from {manifest.recalibrated_from}; "
          "same models, new threshold)")
    print_threshold(manifest)
    print(f"next: badexpert serve {args.out}")
    return 0
