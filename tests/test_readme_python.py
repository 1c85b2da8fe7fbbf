"""The README's "From Python" example runs as written, on a tiny model, in a folder holding the
files it names."""

import re
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from synthetic import add_trigger, make_images, train_backdoored, write_image_folder

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## From Python"


def readme_python_blocks(section: str = SECTION) -> list[str]:
    """The ```python blocks of one README section (from its heading to the next ``## ``)."""
    text = README.read_text()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], flags=re.DOTALL)


def write_flat_folder(root: Path, images: torch.Tensor) -> None:
    root.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / f"{index:04d}.png")


def test_the_from_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = readme_python_blocks()
    assert blocks, f"no python block in the README's {SECTION!r} section"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_images, train_labels = make_images(200, seed=0)
        save_file(train_backdoored(train_images, train_labels, epochs=3).state_dict(), tmp_path / "suspect.safetensors")
        images, labels = make_images(120, seed=1)
        write_image_folder(tmp_path / "reserved_clean", images[:80], labels[:80])  # folders class_0 ... class_3
        write_flat_folder(tmp_path / "more_clean", images[80:])
        test_images, test_labels = make_images(24, seed=2)
        write_flat_folder(tmp_path / "incoming", test_images[:6])
        write_image_folder(tmp_path / "test_clean", test_images, test_labels)
        write_flat_folder(tmp_path / "test_triggered", add_trigger(test_images[test_labels != 0]))
        monkeypatch.chdir(tmp_path)
        for block in blocks:
            exec(compile(block, f"{README.name}: {SECTION}", "exec"), {"__name__": "readme_example"})
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"\d+ of 6 images rejected", out) and "AUROC" in out
    assert (tmp_path / "bundles" / "recalibrated" / "manifest.json").is_file()
    assert (tmp_path / "report" / "report.json").is_file()
