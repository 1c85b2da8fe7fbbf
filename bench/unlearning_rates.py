"""What the unlearning rate does to the backdoor expert, on a built guard's own model and auxiliary.

    python -m bench.unlearning_rates --arch cifar_vgg11_bn_compact --attacks wanet --rates 1e-4 2e-4 3e-4 5e-4

For a ``cal20`` bundle of ``bench.operating_point``, the expert is retrained (one epoch of Adam on
the bundle's own D_fit with the shifted labels, as ``badexpert build`` does) at each rate; the
bundle's auxiliary model and M stay. Printed per rate: the expert's D_select accuracy (what the
build's rule looks at: the smallest rate at which it falls to half of M's), the median expert
agreement b on the triggered inputs M sends to the target (near 1: the backdoor survived the
unlearning), and the AUROC at alpha 0.5 on 2,000 evaluation images (clean M-correct vs triggered
successful). A diagnostic: nothing here chooses a rate.
"""

from __future__ import annotations

import torch

from bench.attacks import ATTACKS
from bench.cifar10 import CACHE, attacks_with_data
from bench.operating_point import ROOT, bench_parser, split_test_set, variant_folder
from defense.build import stratified_split
from defense.bundle import load_bundle
from defense.data import load_image_folder
from defense.evaluation import auroc
from defense.finetune import accuracy, predict_logits, unlearn
from defense.score import guard_scores


def rate_rows(name: str, arch: str, seed: int, rates: list[float], data: dict, device: str, n_eval: int = 2000):
    attack = ATTACKS[name]()
    guard, manifest = load_bundle(variant_folder(ROOT / "bundles" / f"{attack.model_attack or name}_{arch}_seed{seed}",
                                                 "cal20"), device)
    reserved = load_image_folder(CACHE / "bench" / "reserved" / f"seed{seed}_n2000", guard.preprocessing, progress=False)
    fit, select, _ = stratified_split(reserved.labels, (manifest.settings["selection_fraction"],
                                                        manifest.settings["calibration_fraction"]), seed)
    _, eval_index = split_test_set(len(data["test_labels"]), seed)
    images, labels = data["test_images"][eval_index][:n_eval], data["test_labels"][eval_index][:n_eval]
    triggered = attack.apply(images)
    normalizer = guard.normalizer
    with torch.inference_mode():
        model_clean, model_triggered = guard.model(normalizer(images)), guard.model(normalizer(triggered))
        auxiliary_clean = guard.auxiliary_model(normalizer(images))
        auxiliary_triggered = guard.auxiliary_model(normalizer(triggered))
    correct = model_clean.argmax(1) == labels
    successful = attack.counted(labels) & (model_triggered.argmax(1) == attack.targets(labels))
    recorded = manifest.backdoor_expert.get("wrong_label_of")  # bundles before the derangement option: the shift
    wrong_label_of = None if recorded is None else torch.tensor(recorded)
    for rate in rates:
        expert = unlearn(guard.model, reserved.images[fit], reserved.labels[fit], manifest.num_classes, normalizer, rate,
                         device=device, seed=seed, progress=False, wrong_label_of=wrong_label_of)
        select_accuracy = accuracy(predict_logits(expert, reserved.images[select], normalizer, device),
                                   reserved.labels[select])
        with torch.inference_mode():
            clean = guard_scores(model_clean, expert(normalizer(images)), auxiliary_clean, alpha=0.5)
            trig = guard_scores(model_triggered, expert(normalizer(triggered)), auxiliary_triggered, alpha=0.5)
        yield {"rate": rate, "expert_select_accuracy": select_accuracy,
               "triggered_b_median": float(trig.expert_agreement[successful].median()),
               "auroc": auroc(clean.score[correct], trig.score[successful])}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rates", nargs="+", type=float, default=[1e-4, 2e-4, 3e-4, 5e-4])
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        for row in rate_rows(name, args.arch, args.seed, args.rates, data, args.device):
            print(f"{name} {args.arch} unlearning lr {row['rate']:g}: expert D_select accuracy "
                  f"{row['expert_select_accuracy']:.3f}, median b on successful triggered inputs "
                  f"{row['triggered_b_median']:.3f}, AUROC {row['auroc']:.4f}", flush=True)


if __name__ == "__main__":
    main()
