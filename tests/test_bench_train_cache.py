"""The bench's trained-model cache is keyed by everything that made a model (issue 28): another
poison rate is another model, and a cached model trained otherwise than asked is trained again,
never reused. A tiny model on a few synthetic 32x32 images stands in for CIFAR-10."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def tiny_bench(monkeypatch, tmp_path):
    import bench.train_attacked as train_attacked

    generator = torch.Generator().manual_seed(0)
    data = {"train_images": torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=generator),
            "train_labels": torch.arange(60) % 10,
            "test_images": torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=generator),
            "test_labels": torch.arange(20) % 10}
    create_model = train_attacked.create_model
    monkeypatch.setattr(train_attacked, "CACHE", tmp_path)
    monkeypatch.setattr(train_attacked, "load_cifar10", lambda: data)
    monkeypatch.setattr(train_attacked, "reserved_split", lambda n, seed: (torch.arange(n), torch.arange(0)))
    monkeypatch.setattr(train_attacked, "create_model", lambda arch, num_classes: create_model("tiny_cnn", num_classes))
    trained = []
    fit = train_attacked.fit

    def counting_fit(model, images, labels, *args, **kwargs):
        trained.append(args[-1] if args else kwargs.get("desc"))
        return fit(model, images, labels, *args, **{**kwargs, "compile_model": False})

    monkeypatch.setattr(train_attacked, "fit", counting_fit)
    monkeypatch.setattr(train_attacked.ATTACKS["badnet"], "train_epochs", 1)  # the attack's epochs, for speed

    def train(**kwargs):
        before = len(trained)
        model, info = train_attacked.train_backdoored("badnet", "tiny_arch", compile_model=False, **kwargs)
        return info, len(trained) > before

    return train_attacked, train


def test_another_poison_rate_is_trained_and_cached_apart_the_same_settings_reuse(tiny_bench, capsys):
    train_attacked, train = tiny_bench
    info, was_trained = train()
    assert was_trained and info["poison_rate"] == 0.01  # BadNet's default
    assert train() == (info, False)  # the same settings: the cached model
    higher, was_trained = train(attack_kwargs={"poison_rate": 0.2})
    assert was_trained and higher["poison_rate"] == 0.2 and higher["attack_settings"]["poison_rate"] == 0.2
    assert train(attack_kwargs={"poison_rate": 0.2}) == (higher, False)
    assert train() == (info, False)  # the default model was not replaced by the 20% one
    default_path = train_attacked.model_path("badnet", "tiny_arch", 0)
    variants = sorted(default_path.parent.glob("badnet_tiny_arch_seed0*.safetensors"))
    assert len(variants) == 2 and default_path in variants


def test_other_epochs_are_another_model_cached_apart_the_default_is_kept(tiny_bench):
    train_attacked, train = tiny_bench
    info, _ = train()
    longer, was_trained = train(epochs=2)
    assert was_trained and longer["epochs"] == 2 and info["epochs"] == 1
    assert train(epochs=2) == (longer, False) and train() == (info, False)  # each reused, neither replaced
    default_path = train_attacked.model_path("badnet", "tiny_arch", 0)
    assert default_path.is_file() and default_path.with_name("badnet_tiny_arch_seed0-epochs2.safetensors").is_file()
    settings = json.loads(json.dumps(__import__("dataclasses").asdict(train_attacked.ATTACKS["badnet"]())))
    assert train_attacked.model_variant("badnet", "tiny_arch", settings, 1) is None
    assert train_attacked.model_variant("badnet", "tiny_arch", {**settings, "poison_rate": 0.2}, 2).endswith("-epochs2")
    assert train_attacked.trained_model_path(longer).name == "badnet_tiny_arch_seed0-epochs2.safetensors"
    assert train_attacked.trained_model_path(info) == default_path


def test_a_stale_cached_model_is_trained_again_never_reused(tiny_bench, capsys):
    train_attacked, train = tiny_bench
    train()
    record = train_attacked.model_path("badnet", "tiny_arch", 0).with_suffix(".json")
    info = json.loads(record.read_text())
    info["attack_settings"]["poison_rate"] = 0.3  # what an older cache held under the default name
    record.write_text(json.dumps(info))
    rebuilt, was_trained = train()
    assert was_trained and rebuilt["attack_settings"]["poison_rate"] == 0.01
    assert "rebuilding badnet_tiny_arch_seed0.safetensors: the cached model was trained with attack_settings" \
        in capsys.readouterr().out
    _, was_trained = train(lr=0.05)  # another learning rate: trained again too
    assert was_trained
    mapping = json.loads(record.read_text())
    del mapping["attack_settings"]  # an entry from before settings were recorded: its poison rate still counts
    mapping["poison_rate"] = 0.05
    record.write_text(json.dumps(mapping))
    _, was_trained = train(lr=0.05)
    assert was_trained and "poison_rate 0.05 (asked: 0.01)" in capsys.readouterr().out


def test_each_architectures_recipe_is_what_the_benches_get(tiny_bench):
    train_attacked, _ = tiny_bench
    assert train_attacked.recipe_lr("cifar_lenet") == 0.02 and train_attacked.recipe_lr("cifar_resnet_compact") == 0.2
    assert train_attacked.recipe_attack_kwargs("cifar_lenet", "blend") == {"poison_rate": 0.05}
    assert train_attacked.recipe_attack_kwargs("cifar_lenet", "blend", {"poison_rate": 0.2}) == {"poison_rate": 0.2}
    lenet_blend = json.loads(json.dumps(__import__("dataclasses").asdict(
        train_attacked.ATTACKS["blend"](poison_rate=0.05))))
    assert train_attacked.settings_variant("blend", "cifar_lenet", lenet_blend) is None  # the recipe's: plain name
    assert train_attacked.settings_variant("blend", "cifar_resnet_compact", lenet_blend) is not None


def test_an_architectures_recipe_epochs_are_its_default_other_epochs_a_variant(tiny_bench, monkeypatch):
    train_attacked, train = tiny_bench
    assert train_attacked.recipe_epochs("cifar_vgg11_bn_compact", "wanet") == 20  # the VGG's WaNet: trained longer
    assert train_attacked.recipe_epochs("cifar_resnet_compact", "wanet") == train_attacked.ATTACKS["wanet"].train_epochs
    assert train_attacked.recipe_epochs("cifar_vgg11_bn_compact", "wanet", 6) == 6  # asked: what was asked
    monkeypatch.setitem(train_attacked.RECIPES, "tiny_arch", {"epochs": {"badnet": 2}})
    info, was_trained = train()
    assert was_trained and info["epochs"] == 2  # the recipe's epochs, not the attack's 1
    default_path = train_attacked.model_path("badnet", "tiny_arch", 0)
    assert train_attacked.trained_model_path(info) == default_path  # the recipe's model: the plain name
    shorter, was_trained = train(epochs=1)  # the attack's own epochs are now a variant, cached apart
    assert was_trained and train_attacked.trained_model_path(shorter).name == "badnet_tiny_arch_seed0-epochs1.safetensors"
    assert train() == (info, False)
