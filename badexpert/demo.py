"""``badexpert demo``: the whole product on a built-in example, with nothing from the user.

The attacker backdoors a small CNN on handwritten digits (:mod:`defense.demo`); the defender runs the
very same ``badexpert build`` a user runs, and the guard is measured on held-out digits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from defense.device import resolve_device


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="the built-in example: backdoor a small classifier, guard it, measure",
                               description="Trains a small classifier with a backdoor on scikit-learn's handwritten "
                                           "digits, builds its guard with 'badexpert build', and measures it.")
    demo.add_argument("--out", type=Path, default=Path("badexpert-demo"), help="working folder (default %(default)s)")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=run_demo_command)


def run_demo_command(args) -> int:
    return run_demo(out=args.out, device=resolve_device(args.device), quiet=args.quiet)


def run_demo(out: Path, device: str = "cpu", quiet: bool = False) -> int:
    from PIL import Image
    from safetensors.torch import save_model

    from badexpert.build import build_command_parser
    from defense.demo import SIZE, TARGET_CLASS, add_trigger, digit_images, train_backdoored_model, write_image_folder
    from defense.evaluation import detection_metrics, signal_breakdown
    from defense.report import signal_lines
    from defense.preprocessing import Preprocessing

    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocessing = Preprocessing(input_size=(SIZE, SIZE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images, labels = digit_images()
    train, reserved, test = slice(0, 900), slice(900, 1500), slice(1500, None)

    print("1/4 attacker: training a backdoored CNN on 900 handwritten digits (10% poisoned, target class 0)")
    model = train_backdoored_model(images[train], labels[train], preprocessing, device)
    weights = out / "suspect_model.safetensors"
    save_model(model, str(weights))

    print("2/4 defender: writing 600 reserved clean digits as an ImageFolder")
    clean_dir = out / "reserved_clean"
    if not clean_dir.exists():
        write_image_folder(clean_dir, images[reserved], labels[reserved])
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    test_images, test_labels = images[test], labels[test]
    Image.fromarray(test_images[1].permute(1, 2, 0).numpy()).save(samples / f"clean_digit_{int(test_labels[1])}.png")
    Image.fromarray(add_trigger(test_images[1:2])[0].permute(1, 2, 0).numpy()).save(samples / "triggered.png")

    print("3/4 defender: badexpert build (the same command a user runs)")
    bundle = out / "bundle"
    argv = ["build", "--model", "tiny_cnn", "--weights", str(weights), "--clean-data", str(clean_dir),
            "--out", str(bundle), "--overwrite", "--preset", "none", "--input-size", str(SIZE), str(SIZE), "--fpr", "0.05",
            "--calibration-fraction", "0.25", "--device", device] + (["--quiet"] if quiet else [])
    print("    badexpert " + " ".join(argv))
    args = build_command_parser().parse_args(argv)
    status = args.handler(args)
    if status:
        return status

    print("4/4 measuring the guard on 297 held-out digits, clean and triggered")
    from defense.bundle import load_bundle

    guard, manifest = load_bundle(bundle, device)
    clean = guard.score(test_images)
    triggered = guard.score(add_trigger(test_images))
    metrics = detection_metrics(guard.rejection_threshold, clean.score, clean.label, test_labels,
                                triggered.score, triggered.label, test_labels, TARGET_CLASS)
    (out / "demo_metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2))
    print()
    print(f"guard on held-out digits (target FPR {manifest.target_fpr:g}, tau {guard.rejection_threshold:.4g}):")
    print(f"  AUROC                 {metrics.auroc:.4f}")
    print(f"  clean accuracy (CA)   {metrics.clean_accuracy_without_guard:.3f} without guard -> "
          f"{metrics.clean_accuracy_with_guard:.3f} with guard (FPR {metrics.fpr:.3f})")
    print(f"  attack success (ASR)  {metrics.asr_without_guard:.3f} without guard -> {metrics.asr_with_guard:.3f} with guard")
    clean_correct = clean.label == test_labels
    successful = (test_labels != TARGET_CLASS) & (triggered.label == TARGET_CLASS)
    for line in signal_lines(signal_breakdown(guard.rejection_threshold, clean, triggered, clean_correct, successful)):
        print(line)
    print(f"demo finished in {time.monotonic() - started:.0f} s; files in {out}/")
    print(f"serve it:  badexpert serve {bundle}")
    print(f"then:      curl -F file=@{samples / 'triggered.png'} http://127.0.0.1:8000/predict")
    return 0
