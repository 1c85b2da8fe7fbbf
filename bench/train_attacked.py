"""Train a backdoored CIFAR-10 classifier (the attacker's side), cached outside the repo.

    python -m bench.train_attacked --attack badnet --arch cifar_resnet_compact --epochs 6

The cache is keyed by what made each model: a model trained with other attack settings than the
attack's defaults (``--poison-rate``, a mapping) is cached under its own name, and a cached model
whose recorded epochs, learning rate or attack settings differ from those asked is trained again,
never reused.

The defender's 2,000 reserved images (bench.cifar10.reserved_split) are never trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from bench.attacks import ATTACKS
from bench.cifar10 import CACHE, load_cifar10, reserved_split
from defense.finetune import predict_logits, random_crop_flip
from defense.models import create_model
from defense.preprocessing import Preprocessing
from defense.progress import progress_bar

PREPROCESSING = Preprocessing.from_preset("cifar")
DEFAULT_EPOCHS = 4  # 2 CPU cores, two models side by side with one thread each: about 11 minutes per model
DEFAULT_LR = 0.2
# How each architecture's bench models are trained unless told otherwise (BENCHMARKS.md's commands):
# the peak learning rate, attack settings other than the attack's defaults (the attacker's choice
# where the defaults do not implant the backdoor), and training epochs other than the attack's
# train_epochs (where those leave the model short of its family's clean accuracy: a model no
# attacker would ship). Every bench asks train_backdoored for these.
RECIPES: dict[str, dict] = {
    "cifar_lenet": {"lr": 0.02, "attack_kwargs": {"badnet": {"poison_rate": 0.1}, "blend": {"poison_rate": 0.05}}},
    "cifar_mobilenet_v2_compact": {"attack_kwargs": {"badnet": {"poison_rate": 0.1}, "blend": {"poison_rate": 0.05}}},
    # WaNet's 6 epochs left the compact VGG at 63-70% clean accuracy (its BadNet and Blend: 79-82%); 20: 82-83%
    "cifar_vgg11_bn_compact": {"epochs": {"wanet": 20}},
}


def recipe_lr(arch: str, lr: float | None = None) -> float:
    return lr if lr is not None else RECIPES.get(arch, {}).get("lr", DEFAULT_LR)


def recipe_attack_kwargs(arch: str, attack_name: str, attack_kwargs: dict | None = None) -> dict:
    return {**RECIPES.get(arch, {}).get("attack_kwargs", {}).get(attack_name, {}), **(attack_kwargs or {})}


def recipe_epochs(arch: str, attack_name: str, epochs: int | None = None) -> int:
    """``epochs`` where given, else the architecture's recipe for the attack, else the attack's train_epochs."""
    if epochs is not None:
        return epochs
    return RECIPES.get(arch, {}).get("epochs", {}).get(attack_name, ATTACKS[attack_name].train_epochs)


def model_path(attack: str, arch: str, seed: int, variant: str | None = None) -> Path:
    """Where the model is cached; ``variant``: a digest of attack settings other than the attack's defaults
    (another poison rate or mapping), so that such a model never takes the default one's place."""
    suffix = f"-{variant}" if variant else ""
    return CACHE / "bench" / "models" / f"{attack}_{arch}_seed{seed}{suffix}.safetensors"


def settings_variant(attack_name: str, arch: str, settings: dict) -> str | None:
    """None for the architecture's recipe settings of the attack, else a short digest of ``settings``
    (model_path's variant)."""
    default = json.loads(json.dumps(dataclasses.asdict(ATTACKS[attack_name](**recipe_attack_kwargs(arch, attack_name)))))
    if settings == default:
        return None
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def model_variant(attack_name: str, arch: str, settings: dict, epochs: int) -> str | None:
    """model_path's variant for a model of ``settings`` trained for ``epochs``: the settings' digest where
    they are not the recipe's, and ``epochs<N>`` where N is not the recipe's epochs (recipe_epochs: a model
    trained longer or shorter is another model, cached apart); None for the recipe's model."""
    parts = [settings_variant(attack_name, arch, settings)]
    if epochs != recipe_epochs(arch, attack_name):
        parts.append(f"epochs{epochs}")
    return "-".join(part for part in parts if part) or None


def trained_model_path(info: dict) -> Path:
    """Where the model that ``train_backdoored`` returned with ``info`` is cached (its variant included;
    an entry older than recorded settings was cached under the recipe's name)."""
    attack, arch = info["attack"], info["arch"]
    settings = info.get("attack_settings")
    if settings is None:
        settings = json.loads(json.dumps(dataclasses.asdict(ATTACKS[attack](**recipe_attack_kwargs(arch, attack)))))
    return model_path(attack, arch, info["seed"], model_variant(attack, arch, settings, info["epochs"]))


def stale_reason(info: dict, asked: dict) -> str | None:
    """How a cached model's recorded training differs from what is asked (None: it does not). A value
    the entry does not record (an older cache) is not held against it, except the poison rate, which
    every backdoored entry records."""
    for key, value in asked.items():
        recorded = info.get(key)
        if value is None:
            continue
        if recorded is None and key == "attack_settings":
            recorded, value, key = info.get("poison_rate"), value.get("poison_rate"), "poison_rate"
        if recorded is not None and recorded != value:
            return f"{key} {recorded} (asked: {value})"
    return None


def fit(model, images, labels, epochs: int, lr: float, seed: int, device: str, desc: str,
        batch_size: int = 256, compile_model: bool = True):
    """SGD (Nesterov, one-cycle schedule) with random crop + flip, channels-last; in place."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).to(memory_format=torch.channels_last)
    normalizer = PREPROCESSING.normalizer().to(device)
    network = torch.compile(model) if compile_model else model
    steps_per_epoch = -(-len(labels) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.25)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in progress_bar(range(0, len(labels), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            index = order[start:start + batch_size]
            batch = normalizer(random_crop_flip(images[index].to(device), generator))
            loss = F.cross_entropy(network(batch.contiguous(memory_format=torch.channels_last)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().to(memory_format=torch.contiguous_format)


def _cached(name: str, arch: str, seed: int, epochs: int, settings: dict | None = None, lr: float | None = None,
            variant: str | None = None):
    """The cached model and its info when it was trained as asked (epochs, learning rate, attack settings:
    poison rate and mapping included); None when there is none, or when the one cached is stale: it is
    then trained again, never reused."""
    path = model_path(name, arch, seed, variant) if variant else model_path(name, arch, seed)
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    info = json.loads(path.with_suffix(".json").read_text())
    stale = stale_reason(info, {"epochs": epochs, "lr": lr, "attack_settings": settings})
    if stale is not None:
        print(f"rebuilding {path.name}: the cached model was trained with {stale}")
        return None
    model = create_model(arch, num_classes=10)
    load_model(model, str(path), device="cpu")
    return model.eval(), info


def _save(model, info: dict, name: str, arch: str, seed: int, variant: str | None = None) -> None:
    path = model_path(name, arch, seed, variant) if variant else model_path(name, arch, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model.cpu(), str(path))
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))


def train_clean(arch: str = "cifar_resnet_compact", epochs: int = DEFAULT_EPOCHS, seed: int = 0, device: str = "cpu",
                lr: float | None = None, compile_model: bool = True):
    """A model trained without any poison (the starting point of post-development attacks); ``lr``
    None: the architecture's recipe."""
    lr = recipe_lr(arch, lr)
    cached = _cached("clean", arch, seed, epochs, lr=lr)
    if cached:
        return cached
    data = load_cifar10()
    train_index, _ = reserved_split(len(data["train_labels"]), seed=seed)
    started = time.monotonic()
    model = fit(create_model(arch, num_classes=10), data["train_images"][train_index], data["train_labels"][train_index],
                epochs, lr, seed, device, "clean", compile_model=compile_model)
    logits = predict_logits(model, data["test_images"], PREPROCESSING.normalizer().to(device), device)
    info = {"attack": "clean", "arch": arch, "epochs": epochs, "lr": lr, "seed": seed,
            "clean_accuracy": float((logits.argmax(1) == data["test_labels"]).float().mean()),
            "train_seconds": round(time.monotonic() - started, 1)}
    _save(model, info, "clean", arch, seed)
    return model, info


def train_backdoored(attack_name: str, arch: str = "cifar_resnet_compact", epochs: int | None = None, seed: int = 0,
                     lr: float | None = None, device: str = "cpu", attack_kwargs: dict | None = None,
                     compile_model: bool = True):
    """Train once; later calls load the cached weights when they were trained as asked. Returns (model, info dict).

    Post-development attacks (``finetunes_clean_model``) start from ``train_clean``'s model and
    finetune it on the poisoned set instead of training from scratch. ``epochs`` (for those, the clean
    model's epochs), ``lr`` and ``attack_kwargs`` default to the architecture's recipe (RECIPES, where
    it names them; else the attack's ``train_epochs`` and defaults; given attack_kwargs override it)."""
    lr = recipe_lr(arch, lr)
    attack_kwargs = recipe_attack_kwargs(arch, attack_name, attack_kwargs)
    attack = ATTACKS[attack_name](**attack_kwargs)
    epochs = recipe_epochs(arch, attack_name, epochs)
    settings = json.loads(json.dumps(dataclasses.asdict(attack)))  # as stored: tuples become lists
    variant = model_variant(attack_name, arch, settings, epochs)
    cached = _cached(attack_name, arch, seed, epochs, settings, lr=lr, variant=variant)
    if cached:
        return cached
    data = load_cifar10()
    train_index, _ = reserved_split(len(data["train_labels"]), seed=seed)
    images, labels, poisoned = attack.poison(data["train_images"][train_index], data["train_labels"][train_index], seed)
    started = time.monotonic()
    if attack.finetunes_clean_model:
        model, clean_info = train_clean(arch, epochs, seed, device, lr, compile_model)
        model = fit(model, images, labels, attack.finetune_epochs, attack.finetune_lr, seed + 1, device, attack_name,
                    compile_model=compile_model)
        recipe = {"finetuned_from": "clean", "lr": lr, "clean_epochs": clean_info["epochs"],
                  "finetune_epochs": attack.finetune_epochs, "finetune_lr": attack.finetune_lr}
    else:
        model = fit(create_model(arch, num_classes=10), images, labels, epochs, lr, seed, device, attack_name,
                    compile_model=compile_model)
        recipe = {"lr": lr}
    normalizer = PREPROCESSING.normalizer().to(device)
    test_logits = predict_logits(model, data["test_images"], normalizer, device)
    clean_accuracy = float((test_logits.argmax(1) == data["test_labels"]).float().mean())
    counted = attack.counted(data["test_labels"])
    triggered = attack.apply(data["test_images"][counted])
    predictions = predict_logits(model, triggered, normalizer, device).argmax(1)
    asr = float((predictions == attack.targets(data["test_labels"][counted])).float().mean())
    info = {"attack": attack_name, "arch": arch, "epochs": epochs, **recipe, "seed": seed, "poison_rate": attack.poison_rate,
            "poisoned_samples": int(poisoned.sum()), "target_class": attack.target_class,
            "clean_accuracy": clean_accuracy, "attack_success_rate": asr,
            "train_seconds": round(time.monotonic() - started, 1), "attack_kwargs": attack_kwargs or {},
            "attack_settings": settings}
    _save(model, info, attack_name, arch, seed, variant)
    return model, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", default="badnet", choices=["clean", *sorted(ATTACKS)],
                        help="'clean': no poison (the start of post-development attacks)")
    parser.add_argument("--arch", default="cifar_resnet_compact")
    parser.add_argument("--epochs", type=int,
                        help=f"training epochs (default: the architecture's recipe, RECIPES above, else the attack's "
                             f"train_epochs in bench/attacks.py: the ones BENCHMARKS.md reports; {DEFAULT_EPOCHS} for "
                             f"'clean'). Other epochs make a variant, cached apart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float,
                        help=f"peak learning rate of the one-cycle schedule (default: the architecture's recipe, "
                             f"else {DEFAULT_LR}; a network without BatchNorm needs less: 0.02 for cifar_lenet)")
    parser.add_argument("--poison-rate", type=float,
                        help="the attack's poison rate instead of the architecture's recipe or the attack's default; "
                             "such a model is cached under its own name, recorded in the model's JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it saves about 40%% per step on CPU)")
    args = parser.parse_args()
    if args.attack == "clean":
        _, info = train_clean(args.arch, args.epochs or DEFAULT_EPOCHS, args.seed, device=args.device, lr=args.lr,
                              compile_model=not args.no_compile)
    else:
        _, info = train_backdoored(args.attack, args.arch, args.epochs, args.seed, lr=args.lr, device=args.device,
                                   attack_kwargs=None if args.poison_rate is None else {"poison_rate": args.poison_rate},
                                   compile_model=not args.no_compile)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
