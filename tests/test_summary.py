"""bench.summary reads bench.detection's result files by name and lays them out; no data needed."""

from __future__ import annotations

import json

from bench.summary import ablation_table, guard_table, label_free_table, load_results


def write_result(folder, name: str, auroc: float, n: int = 2000, auxiliary_asr: float = 0.05,
                 model_asr: float = 0.99) -> None:
    guard = {"auroc": auroc, "tpr": 0.9, "fpr": 0.002, "clean_accuracy_without_guard": 0.8,
             "clean_accuracy_with_guard": 0.79, "asr_without_guard": model_asr, "asr_with_guard": 0.06,
             "expert_clean_accuracy": 0.2, "expert_asr": 0.99, "auxiliary_clean_accuracy": 0.7,
             "auxiliary_asr": auxiliary_asr, "unlearn_lr": 5e-4, "finetune_lr": 0.1,
             "calibration": {"n": n // 5, "k": 2, "n_finetune": n - n // 5}}
    (folder / f"{name}.json").write_text(json.dumps({"model": {"epochs": 4}, "guard": guard}))


def test_tables_pair_labeled_and_label_free_runs_and_list_the_ablation(tmp_path):
    write_result(tmp_path, "badnet_cifar_resnet_compact_seed0_n2000", 0.99)
    write_result(tmp_path, "badnet_cifar_resnet_compact_seed0_n2000_label_free_pseudo", 0.97, auxiliary_asr=0.4)
    write_result(tmp_path, "blend_cifar_resnet_compact_seed0_n2000", 0.995)
    write_result(tmp_path, "blend_cifar_resnet_compact_seed0_n2000_label_free_pseudo", 0.985)
    write_result(tmp_path, "badnet_cifar_resnet_compact_seed0_n400", 0.9, n=400)
    write_result(tmp_path, "wanet_cifar_resnet_compact_seed0_n2000", 0.6, model_asr=0.45)  # not learned
    write_result(tmp_path, "wanet_cifar_resnet_compact_seed0_n2000_label_free_pseudo", 0.5, model_asr=0.45)
    write_result(tmp_path, "tact_cifar_resnet_compact_seed0_n2000", 0.97)
    write_result(tmp_path, "not_an_attack_cifar_resnet_compact_seed0_n2000", 0.5)
    (tmp_path / "benchmark.json").write_text("{}")
    rows = load_results(tmp_path)
    assert sorted((r["attack"], r["n"], r["tag"]) for r in rows) == [
        ("badnet", 400, ""), ("badnet", 2000, ""), ("badnet", 2000, "_label_free_pseudo"),
        ("blend", 2000, ""), ("blend", 2000, "_label_free_pseudo"), ("tact", 2000, ""),
        ("wanet", 2000, ""), ("wanet", 2000, "_label_free_pseudo")]

    guard = guard_table(rows)
    assert guard[2].startswith("| badnet | 4 | 80.0 | 99.0 | 99.00 |")
    assert [line.split(" | ")[0] for line in guard[2:6]] == ["| badnet", "| blend", "| wanet (not counted)",
                                                            "| tact (adaptive)"]
    # means over the attacks that count: (99.0 + 99.5) / 2, and TaCT alone
    assert guard[6].startswith("| **mean AUROC, 2 counted standard** | | | | **99.25** |")
    assert guard[7].startswith("| **mean AUROC, 1 counted adaptive** | | | | **97.00** |")
    assert len(guard) == 8

    label_free = label_free_table(rows)
    assert "| badnet | pseudo | 99.00 | 97.00 | -2.00 | 6.0 | 70.0 / 40.0 |" in label_free
    assert label_free[-1] == "| **mean** | pseudo | | | **-1.50** | | |"  # (-2.0 + -1.0) / 2; WaNet does not count
    assert not any(line.startswith("| wanet") for line in label_free)

    ablation = ablation_table(rows)
    assert [line.split(" | ")[1] for line in ablation[2:]] == ["400", "2000"]
    assert ablation[2] == "| badnet | 400 | 320 / 80 | 90.00 | 79.0 | 6.0 | 0.20 | k = 2 |"
