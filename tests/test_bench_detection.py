"""bench.detection scores each image set in one pass of the three models; it must agree with the
guard's own scoring and with each model run alone (tiny untrained models, no data needed)."""

from __future__ import annotations

import torch

from bench.detection import _score_with_predictions
from defense.finetune import predict_logits
from defense.guard import Guard
from defense.models import create_model
from synthetic import NUM_CLASSES, PREPROCESSING, make_images


def test_one_pass_scores_equal_the_guards_scores_and_each_models_labels():
    torch.manual_seed(0)
    models = [create_model("tiny_cnn", num_classes=NUM_CLASSES).eval() for _ in range(3)]
    guard = Guard(*models, preprocessing=PREPROCESSING, rejection_threshold=0.5)
    images, _ = make_images(23, seed=1)
    scores, expert_labels, auxiliary_labels = _score_with_predictions(guard, images, batch_size=5)
    expected = guard.score(images, batch_size=7)
    for name, value in vars(expected).items():
        torch.testing.assert_close(getattr(scores, name), value, msg=name, equal_nan=True)
    normalizer = PREPROCESSING.normalizer()
    assert torch.equal(expert_labels, predict_logits(models[1], images, normalizer, "cpu").argmax(1))
    assert torch.equal(auxiliary_labels, predict_logits(models[2], images, normalizer, "cpu").argmax(1))


def test_bench_trains_each_attack_for_its_own_epochs_unless_told(monkeypatch):
    """The tables' models are reproduced by the bench commands without an --epochs flag."""
    import bench.train_attacked as train_attacked

    asked = []

    def cached_model(name, arch, seed, epochs, settings=None, **training):
        asked.append((name, epochs))
        return "model", {"epochs": epochs}

    monkeypatch.setattr(train_attacked, "_cached", cached_model)
    train_attacked.train_backdoored("badnet_all_to_all")
    train_attacked.train_backdoored("adaptive_patch")
    train_attacked.train_backdoored("tact")
    train_attacked.train_backdoored("badnet", epochs=3)
    assert asked == [("badnet_all_to_all", 20), ("adaptive_patch", 12), ("tact", 4), ("badnet", 3)]


def test_a_cached_model_trained_with_other_attack_settings_is_not_reused(monkeypatch, tmp_path, capsys):
    import bench.train_attacked as train_attacked

    monkeypatch.setattr(train_attacked, "model_path", lambda name, arch, seed, variant=None: tmp_path / f"{name}.safetensors")
    settings = {"target_class": 0, "poison_rate": 0.05, "finetune_epochs": 1}
    train_attacked._save(create_model("tiny_cnn", num_classes=10), {"epochs": 4, "attack_settings": settings},
                         "finetune", "tiny_cnn", 0)
    assert train_attacked._cached("finetune", "tiny_cnn", 0, 4, settings) is not None
    assert "rebuilding" not in capsys.readouterr().out
    assert train_attacked._cached("finetune", "tiny_cnn", 0, 4, {**settings, "finetune_epochs": 2}) is None
    assert "'finetune_epochs': 1" in capsys.readouterr().out
