"""An end-to-end task on which the expert's learning rate decides the result.

The easy synthetic task of test_build_cli.py saturates (model and auxiliary at 100%, AUROC 1.000
whatever the settings). Here the clean task is hard (a faint 4x4 colour cue under heavy noise:
the model reaches about 90% with moderate confidence) while the backdoor is strong, and the
auxiliary model is the suspect model itself (`--auxiliary-model/--auxiliary-weights`: a repair
that removed nothing). So only the backdoor expert separates triggered from clean inputs:

- the automatic unlearning rate (the smallest that halves the expert's accuracy) gives AUROC
  0.77-0.86 (measured over data seeds 2-5 and calibration fractions 0.4 / 0.5);
- a rate too small to make the expert forget (1e-5: B stays M) gives 0.64-0.69 on the same data.

The test asserts both sides of 0.75 on one seed.
"""

from __future__ import annotations

import contextlib
import io
import json

import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from defense.bundle import load_bundle
from badexpert.main import main
from synthetic import COLORS, NUM_CLASSES, SIZE, TARGET, add_trigger, train_backdoored, write_image_folder

SEED = 5
NOISE, SQUARE, CONTRAST = 60.0, 4, 0.5
BOUNDARY = 0.75


def hard_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise (sd 60) with a 4x4 square at half the colour contrast; the colour is the class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = 110 + NOISE * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    rows = torch.randint(0, SIZE - SQUARE - 3, (n,), generator=generator)
    cols = torch.randint(0, SIZE - SQUARE - 3, (n,), generator=generator)
    for i in range(n):
        shift = CONTRAST * (COLORS[labels[i]] - 110)
        images[i, :, rows[i]:rows[i] + SQUARE, cols[i]:cols[i] + SQUARE] += shift[:, None, None]
    return images.clamp(0, 255).to(torch.uint8), labels


def test_the_automatic_unlearning_rate_beats_a_too_small_one_on_a_hard_task(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_images, train_labels = hard_images(800, 10 * SEED)
        model = train_backdoored(train_images, train_labels, epochs=6, seed=SEED)
        weights = tmp_path / "suspect.safetensors"
        save_file(model.state_dict(), weights)
        reserved_images, reserved_labels = hard_images(400, 10 * SEED + 1)
        write_image_folder(tmp_path / "reserved", reserved_images, reserved_labels)
        test_images, test_labels = hard_images(400, 10 * SEED + 2)
        triggered = add_trigger(test_images[test_labels != TARGET])

        def build_and_measure(name: str, *extra: str) -> tuple[float, dict]:
            argv = ["build", "--model", "tiny_cnn", "--weights", str(weights),
                    "--clean-data", str(tmp_path / "reserved"), "--out", str(tmp_path / name),
                    "--input-size", str(SIZE), str(SIZE), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                    "--fpr", "0.05", "--calibration-fraction", "0.5", "--quiet",
                    # 200 D_fit images: batches of 16 give the expert 13 steps, like one epoch over
                    # about 1,600 images in the default batches of 128.
                    "--unlearn-batch-size", "16",
                    "--auxiliary-model", "tiny_cnn", "--auxiliary-weights", str(weights),
                    "--signals", "expert",  # the expert's rate is what is measured here, not the feature signal
                    *extra]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert main(argv) == 0
            guard, _ = load_bundle(tmp_path / name)
            clean, attacked = guard.score(test_images), guard.score(triggered)
            assert float((attacked.label == TARGET).float().mean()) > 0.8  # the backdoor is real
            truth = [0] * len(clean.score) + [1] * len(attacked.score)
            auroc = roc_auc_score(truth, (-torch.cat([clean.score, attacked.score]).double()).tolist())
            return auroc, json.loads((tmp_path / name / "manifest.json").read_text())

        auto, manifest = build_and_measure("auto")
        too_small, _ = build_and_measure("too_small", "--unlearn-lr", "1e-5")
    finally:
        torch.set_num_threads(threads)

    accuracy = manifest["accuracy_on_selection"]
    assert 0.8 < accuracy["model"] < 0.97, "the clean task must be hard, not saturated"
    assert manifest["backdoor_expert"]["chosen_by"] == "auto"
    assert manifest["backdoor_expert"]["lr"] > 1e-5
    assert auto >= BOUNDARY, f"automatic rate: AUROC {auto:.3f}"
    assert too_small < BOUNDARY, f"rate 1e-5: AUROC {too_small:.3f}; the task no longer tells the settings apart"
    assert auto - too_small > 0.1
