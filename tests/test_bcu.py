"""BCU (label-free auxiliary model) and the label-free guard: re-initialization, temperature,
distillation, and ``badexpert build --no-labels`` / ``--auxiliary-weights`` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_model

from defense.bcu import (DEFAULT_STAGE_PROBABILITIES, bcu_distill, conv_linear_layers, depth_stages,
                         distillation_loss, distillation_temperature, reinitialize)
from defense.build import BuildConfig, build_guard
from badexpert.main import main as badexpert
from defense.data import ImageSet
from defense.finetune import Diverged, predict_logits
from defense.models import create_model
from defense.preprocessing import Preprocessing

SIZE = 16
CLASSES = 4
TARGET = 0
PALETTE = torch.tensor([[230, 40, 40], [40, 200, 40], [40, 60, 230], [220, 220, 40]], dtype=torch.uint8)
PREPROCESSING = Preprocessing(input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on several busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- re-initialization

def kept_fractions(original: nn.Module, student: nn.Module, num_stages: int) -> dict[str, float]:
    """Per depth stage, the share of conv/linear weight and bias entries left as they were."""
    before, after = dict(original.named_parameters()), dict(student.named_parameters())
    fractions = {}
    for stage, layers in depth_stages(original, num_stages):
        kept = total = 0
        for layer in layers:
            for suffix in (".weight", ".bias"):
                name = layer + suffix
                if name in before:
                    kept += int((before[name] == after[name]).sum())
                    total += before[name].numel()
        fractions[stage] = (kept / total, total) if total else (math.nan, 0)
    return fractions


def assert_keep_ratios(model: nn.Module, probabilities) -> None:
    student = reinitialize(model, probabilities, torch.Generator().manual_seed(1))
    fractions = kept_fractions(model, student, len(probabilities) - 2)
    for (stage, (fraction, total)), p in zip(fractions.items(), probabilities):
        if total == 0:
            continue
        tolerance = 5 * math.sqrt(p * (1 - p) / total) + 1e-3
        assert abs(fraction - (1 - p)) <= tolerance, (stage, fraction, 1 - p, total)


def assert_only_conv_linear_changed(model: nn.Module, student: nn.Module) -> None:
    reinitialized = {f"{name}.{suffix}" for name, _ in conv_linear_layers(model) for suffix in ("weight", "bias")}
    student_state = student.state_dict()
    for name, tensor in model.state_dict().items():  # BatchNorm weights, biases and running statistics too
        if name not in reinitialized:
            assert torch.equal(tensor, student_state[name]), name


def test_torchvision_resnet18_stages_and_keep_ratios():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    stages = dict(depth_stages(model))
    # The layer-order split recovers ResNet-18's real stages without using any layer names.
    assert stages["stem"] == ["conv1"] and stages["classifier"] == ["fc"]
    for index in range(1, 5):
        assert all(name.startswith(f"layer{index}.") for name in stages[f"stage{index}"]), stages[f"stage{index}"]
    assert [len(stages[f"stage{i}"]) for i in range(1, 5)] == [4, 5, 5, 5]
    assert_keep_ratios(model, DEFAULT_STAGE_PROBABILITIES)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    student = reinitialize(model, DEFAULT_STAGE_PROBABILITIES, torch.Generator().manual_seed(2))
    assert_only_conv_linear_changed(model, student)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items()), "the teacher must not change"
    # Fresh entries come from PyTorch's default range, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    changed = student.fc.weight != model.fc.weight
    assert changed.any() and student.fc.weight[changed].abs().max() <= 1 / math.sqrt(512)


def test_lenet_without_batchnorm_keep_ratios():
    model = create_model("cifar_lenet", 10)
    stages = depth_stages(model)
    assert stages[0] == ("stem", ["features.0"]) and stages[-1] == ("classifier", ["classifier.5"])
    assert sum(len(layers) for _, layers in stages) == 5
    assert_keep_ratios(model, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6))  # distinct values: a stage mix-up shows
    assert_keep_ratios(model, DEFAULT_STAGE_PROBABILITIES)
    student = reinitialize(model, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), student.state_dict().values()))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_any_number_of_stages_and_batchnorm_untouched():
    model = create_model("tiny_cnn", CLASSES)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.weight.uniform_(0.5, 1.5)
    student = reinitialize(model, (0.5, 0.5, 0.5), torch.Generator().manual_seed(0))  # one middle stage
    assert_only_conv_linear_changed(model, student)
    assert [name for name, _ in depth_stages(model, 1)] == ["stem", "stage1", "classifier"]
    scripted = torch.jit.script(model)
    scripted_student = reinitialize(scripted, (0.5, 0.5, 0.5), torch.Generator().manual_seed(0))
    assert len(conv_linear_layers(scripted)) == 4
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), scripted_student.state_dict().values()))


# ----------------------------------------------------------------------------- distillation

def test_temperature_schedule():
    assert distillation_temperature(0, 4) == pytest.approx(1.75)
    assert distillation_temperature(3, 4) == pytest.approx(4.0)
    assert distillation_temperature(0, 100) == pytest.approx(1.03)
    assert distillation_temperature(99, 100) == pytest.approx(4.0)
    values = [distillation_temperature(e, 10) for e in range(10)]
    assert values == sorted(values)


def test_distillation_loss_is_kl_times_t_squared():
    teacher, student = torch.randn(8, 5), torch.randn(8, 5)
    assert distillation_loss(teacher, teacher, 3.0).abs() < 1e-6
    t = 2.5
    p, log_q = F.softmax(teacher / t, 1), F.log_softmax(student / t, 1)
    manual = (p * (p.log() - log_q)).sum(1).mean() * t * t
    assert distillation_loss(student, teacher, t) == pytest.approx(float(manual), rel=1e-5)


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a block of colour k at a random place on a grey noise background."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(60, 140, (n, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    for i in range(n):
        y, x = torch.randint(0, SIZE - 8, (2,), generator=generator).tolist()
        images[i, :, y:y + 8, x:x + 8] = PALETTE[labels[i]][:, None, None]
    return images, labels


def add_trigger(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    checker = ((torch.arange(3)[:, None] + torch.arange(3)[None, :]) % 2 * 255).to(torch.uint8)
    out[..., -4:-1, -4:-1] = checker
    return out


def train_backdoored_tiny_cnn() -> nn.Module:
    """A tiny CNN trained on synthetic images, 1 in 8 non-target ones carrying the patch and label 0."""
    torch.manual_seed(0)
    images, labels = synthetic_images(600, seed=0)
    poisoned = (torch.arange(len(labels)) % 8 == 0) & (labels != TARGET)
    images[poisoned], labels[poisoned] = add_trigger(images[poisoned]), TARGET
    model = create_model("tiny_cnn", CLASSES)
    normalizer = PREPROCESSING.normalizer()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(12):
        model.train()
        for index in torch.randperm(len(labels)).split(64):
            loss = F.cross_entropy(model(normalizer(images[index])), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """The backdoored tiny CNN, its weights file, and clean images as a flat folder and an ImageFolder."""
    model = train_backdoored_tiny_cnn()
    root = tmp_path_factory.mktemp("bcu")
    save_model(model, str(root / "model.safetensors"))
    clean, clean_labels = synthetic_images(160, seed=1)
    flat, tree = root / "flat", root / "tree"
    flat.mkdir()
    for i, (image, label) in enumerate(zip(clean, clean_labels)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(flat / f"{i:04d}.png")
        (tree / f"class{int(label)}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tree / f"class{int(label)}" / f"{i:04d}.png")
    test, test_labels = synthetic_images(200, seed=2)
    return {"model": model, "root": root, "weights": root / "model.safetensors", "flat": flat, "tree": tree,
            "clean": clean, "test": test, "test_labels": test_labels}


def test_backdoored_fixture_is_backdoored(backdoored):
    normalizer = PREPROCESSING.normalizer()
    test, labels = backdoored["test"], backdoored["test_labels"]
    clean_accuracy = (predict_logits(backdoored["model"], test, normalizer).argmax(1) == labels).float().mean()
    source = labels != TARGET
    asr = (predict_logits(backdoored["model"], add_trigger(test[source]), normalizer).argmax(1) == TARGET).float().mean()
    assert clean_accuracy > 0.9 and asr > 0.9, (clean_accuracy, asr)


def test_bcu_distill_keeps_the_clean_function_and_drops_the_backdoor(backdoored):
    normalizer = PREPROCESSING.normalizer()
    student = bcu_distill(backdoored["model"], backdoored["clean"], normalizer, epochs=4, batch_size=32, progress=False)
    test, labels = backdoored["test"], backdoored["test_labels"]
    accuracy = (predict_logits(student, test, normalizer).argmax(1) == labels).float().mean()
    triggered = add_trigger(test[labels != TARGET])
    asr = (predict_logits(student, triggered, normalizer).argmax(1) == TARGET).float().mean()
    assert accuracy > 0.9 and asr < 0.6, (accuracy, asr)  # M: accuracy and ASR both above 0.9


def test_bcu_distill_detects_divergence(backdoored):
    with pytest.raises(Diverged):
        bcu_distill(backdoored["model"], backdoored["clean"], PREPROCESSING.normalizer(), epochs=3, lr=1e12,
                    batch_size=32, progress=False)


# ----------------------------------------------------------------------------- the label-free build

def test_build_guard_label_free_in_memory(backdoored):
    """What a benchmark calls: uint8 tensors in, no labels, BCU auxiliary."""
    clean = ImageSet(backdoored["clean"], torch.full((160,), -1), [], [None] * 160)
    config = BuildConfig(labels=False, auxiliary="bcu", bcu_epochs=4, bcu_batch_size=64, unlearn_lr=1e-3,
                         progress=False)
    result = build_guard(backdoored["model"], clean, PREPROCESSING, CLASSES, config, log=lambda *_: None)
    record = result.manifest_fields["auxiliary_model"]
    assert record["method"] == "bcu" and record["epochs"] == 4
    assert list(record["reinit_probabilities"].values()) == list(DEFAULT_STAGE_PROBABILITIES)
    assert result.manifest_fields["calibration"]["labels"] is False
    calibration = result.manifest_fields["calibration"]
    data = result.manifest_fields["data"]
    # every held-out image counts: none is filtered out
    assert calibration["n"] + calibration["n_finetune"] + data["rate_selection"]["n"] == 160
    guard = result.guard
    source = backdoored["test_labels"] != TARGET
    clean_scores = guard.score(backdoored["test"]).score
    triggered_scores = guard.score(add_trigger(backdoored["test"][source])).score
    assert triggered_scores.median() < clean_scores.median()


def build_args(backdoored, out, *extra):
    return ["build", "--model", "tiny_cnn", "--weights", str(backdoored["weights"]), "--out", str(out),
            "--input-size", str(SIZE), str(SIZE), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
            "--unlearn-lr", "1e-3", "--device", "cpu", "--quiet", *extra]


def test_cli_no_labels_with_bcu(backdoored, tmp_path):
    out = tmp_path / "bundle"
    status = badexpert(build_args(backdoored, out, "--clean-data", str(backdoored["flat"]), "--no-labels",
                                  "--num-classes", str(CLASSES), "--auxiliary", "bcu", "--bcu-epochs", "3",
                                  "--bcu-batch-size", "64",
                                  "--bcu-lr", "0.02"))
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["auxiliary_model"]["method"] == "bcu"
    assert manifest["auxiliary_model"]["lr"] == 0.02
    assert manifest["settings"]["auxiliary"] == "bcu" and manifest["settings"]["labels"] is False
    assert manifest["calibration"]["labels"] is False


def test_cli_no_labels_defaults_to_finetuning_on_the_models_predictions(backdoored, tmp_path):
    out = tmp_path / "bundle"
    status = badexpert(build_args(backdoored, out, "--clean-data", str(backdoored["flat"]), "--no-labels",
                                  "--num-classes", str(CLASSES), "--finetune-lr", "0.01",
                                  "--finetune-epochs", "2"))
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["auxiliary_model"]
    assert record["method"] == "pseudo_label_finetune" and record["labels"] == "predicted by the model"
    assert record["lr"] == 0.01 and manifest["calibration"]["labels"] is False
    # the auxiliary learned M's function from M's labels: it agrees with M on most D_cal images
    assert manifest["accuracy_on_selection"]["auxiliary_model"] > 0.5


def test_cli_supplied_auxiliary(backdoored, tmp_path):
    repaired = create_model("tiny_cnn", CLASSES)  # stands in for a NAD/ANP/I-BAU output of the same architecture
    repaired.load_state_dict(backdoored["model"].state_dict())
    with torch.no_grad():
        repaired[-1].weight.mul_(0.5)
    save_model(repaired, str(tmp_path / "repaired.safetensors"))
    out = tmp_path / "bundle"
    status = badexpert(build_args(backdoored, out, "--clean-data", str(backdoored["tree"]),
                                  "--auxiliary-weights", str(tmp_path / "repaired.safetensors")))
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["auxiliary_model"]
    assert record["method"] == "supplied" and record["source"]["spec"]["name"] == "tiny_cnn"
    assert record["source"]["weights"] == "repaired.safetensors" and len(record["source"]["weights_sha256"]) == 64
    from defense.bundle import load_bundle
    guard, _ = load_bundle(out)
    assert torch.equal(guard.auxiliary_model[-1].weight, repaired[-1].weight)


@pytest.mark.parametrize("extra, message", [
    (["--auxiliary", "bcu", "--auxiliary-weights", "WEIGHTS"], "cannot be combined"),
    (["--auxiliary-model", "cifar_lenet", "--auxiliary-weights", "WEIGHTS"], "not the architecture"),
    (["--auxiliary-weights", "missing.safetensors"], "--auxiliary-weights missing.safetensors: no such file"),
    (["--auxiliary-model", "no_such_arch", "--auxiliary-weights", "WEIGHTS"], "--auxiliary-model: unknown architecture"),
    (["--bcu-reinit-probabilities", "0.1", "0.2"], "--bcu-reinit-probabilities"),
    (["--bcu-epochs", "0"], "--bcu-epochs"),
])
def test_cli_bad_auxiliary_options_exit_2(backdoored, tmp_path, capsys, extra, message):
    extra = [str(backdoored["weights"]) if item == "WEIGHTS" else item for item in extra]
    clean = ["--clean-data", str(backdoored["flat"] if "--no-labels" in extra else backdoored["tree"])]
    if "--no-labels" in extra:
        clean += ["--num-classes", str(CLASSES)]
    assert badexpert(build_args(backdoored, tmp_path / "bundle", *clean, *extra)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def test_cli_wrong_shape_auxiliary_weights_exit_2(backdoored, tmp_path, capsys):
    save_model(create_model("tiny_cnn", CLASSES + 1), str(tmp_path / "other.safetensors"))
    status = badexpert(build_args(backdoored, tmp_path / "bundle", "--clean-data", str(backdoored["tree"]),
                                  "--auxiliary-weights", str(tmp_path / "other.safetensors")))
    assert status == 2
    assert "--auxiliary-weights" in capsys.readouterr().err


def test_bcu_probability_out_of_range_is_a_usage_error(backdoored, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        badexpert(build_args(backdoored, tmp_path / "bundle", "--clean-data", str(backdoored["tree"]),
                             "--bcu-reinit-probabilities", "0.1", "1.5", "0.1"))
    assert exit_info.value.code == 2
