import io
import sys
import zipfile

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

from defense.errors import UserError
from defense.models import create_model, load_user_model, parse_model_spec, register_model
from defense.models.loading import read_state_dict


def test_cifar_resnet18_has_a_3x3_stem_and_no_maxpool():
    model = create_model("cifar_resnet18", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_cifar_vgg11_bn_has_eight_batchnormed_convolutions_and_five_pools():
    """VGG-11's layout; the compact one is the same at a quarter of the width."""
    for name, parameters in (("cifar_vgg11_bn", (9_200_000, 9_300_000)), ("cifar_vgg11_bn_compact", (570_000, 590_000))):
        model = create_model(name, num_classes=10)
        convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convolutions) == 8 and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert parameters[0] < sum(p.numel() for p in model.parameters()) < parameters[1]


def test_cifar_mobilenet_v2_is_torchvisions_with_a_full_resolution_stem():
    """torchvision's MobileNetV2 blocks; the stem keeps 32x32, so the last feature map is 4x4 (2x2 compact)."""
    for name, parameters, final_side in (("cifar_mobilenet_v2", (2_200_000, 2_300_000), 4),
                                         ("cifar_mobilenet_v2_compact", (690_000, 710_000), 2)):
        model = create_model(name, num_classes=10)
        assert isinstance(model, torchvision.models.MobileNetV2)
        assert model.features[0][0].stride == (1, 1)
        assert model.features(torch.zeros(1, 3, 32, 32)).shape[-1] == final_side
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert parameters[0] < sum(p.numel() for p in model.parameters()) < parameters[1]


def test_any_torchvision_builder_by_name():
    model = create_model("mobilenet_v2", num_classes=7)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="--model: unknown architecture 'resnet19'"):
        parse_model_spec("resnet19", 10)


def test_registering_a_name_twice_fails():
    def tiny_cnn(num_classes):  # the same name as a registered builder
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="registered twice"):
        register_model(tiny_cnn)


def _reference():
    torch.manual_seed(0)
    return create_model("tiny_cnn", 3).eval()


def _same_outputs(a, b):
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


def test_weights_from_safetensors(tmp_path):
    reference = _reference()
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    model = load_user_model(parse_model_spec("tiny_cnn", 3), tmp_path / "w.safetensors")
    assert _same_outputs(model, reference)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "data_parallel"])
def test_weights_from_a_pytorch_state_dict(tmp_path, wrap):
    reference = _reference()
    state = reference.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "data_parallel":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pth")
    assert _same_outputs(load_user_model(parse_model_spec("tiny_cnn", 3), tmp_path / "w.pth"), reference)


def test_weights_saved_on_a_gpu_load_on_the_cpu(tmp_path):
    """Rewrite a checkpoint's storage location to 'cuda' as a GPU-saved file has it."""
    reference = _reference()
    torch.save(reference.state_dict(), tmp_path / "cpu.pth")
    with zipfile.ZipFile(tmp_path / "cpu.pth") as source, zipfile.ZipFile(tmp_path / "gpu.pth", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x04\x00\x00\x00cuda")
            target.writestr(item, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pth", weights_only=True)
    model = load_user_model(parse_model_spec("tiny_cnn", 3), tmp_path / "gpu.pth")
    assert _same_outputs(model, reference)


def test_a_pickled_whole_model_is_refused(tmp_path):
    torch.save(_reference(), tmp_path / "model.pt")  # pickles classes: weights_only refuses it
    with pytest.raises(UserError, match="weights_only=True"):
        read_state_dict(tmp_path / "model.pt")


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    save_file(create_model("tiny_cnn", 5).state_dict(), tmp_path / "five.safetensors")
    with pytest.raises(UserError, match=r"five.safetensors: does not fit the architecture.*shape of"):
        load_user_model(parse_model_spec("tiny_cnn", 3), tmp_path / "five.safetensors")


def test_factory_from_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(3 * 16 * 16, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_model_spec("user_models:make", 3)
    assert spec.kind == "factory"
    reference = sys.modules.get("user_models") or __import__("user_models")
    weights = reference.make().state_dict()
    save_file(weights, tmp_path / "w.safetensors")
    model = load_user_model(spec, tmp_path / "w.safetensors")
    assert torch.equal(model[2].weight, weights["2.weight"])
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        load_user_model(parse_model_spec("no_such_module:make", 3), tmp_path / "w.safetensors")


def test_torchscript_archive_carries_its_weights(tmp_path):
    reference = _reference()
    torch.jit.save(torch.jit.script(reference), str(tmp_path / "model.ts"))
    spec = parse_model_spec(str(tmp_path / "model.ts"), 3)
    assert spec.kind == "torchscript"
    model = load_user_model(spec, None)
    assert _same_outputs(model, reference)
    assert any(p.requires_grad for p in model.parameters())  # finetunable


def test_a_file_that_is_not_torchscript_is_refused_as_model(tmp_path):
    (tmp_path / "notes.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a TorchScript archive"):
        parse_model_spec(str(tmp_path / "notes.pt"), 3)
