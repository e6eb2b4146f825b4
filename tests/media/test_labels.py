"""Class names and preprocessing: labels files, torchvision weights enums, timm configs (metadata only)."""
import pytest
import torch
import torchvision

from guided_swap.media import labels


def test_read_labels_one_name_per_line(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\ufeff cat \ndog\n\n\n", encoding="utf-8")  # a BOM, spaces, trailing blank lines
    assert labels.read_labels(str(path)) == ["cat", "dog"]


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ("cat\n\ndog\n", "empty line at line 2"),
    ('["cat", "dog"]\n', "looks like JSON"),
])
def test_read_labels_refuses_what_would_misname_classes(tmp_path, text, message):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        labels.read_labels(str(path))


def test_read_labels_names_a_missing_or_binary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        labels.read_labels(str(tmp_path / "nothing.txt"))
    binary = tmp_path / "weights.pth"
    binary.write_bytes(b"\x80\x81\xfe\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        labels.read_labels(str(binary))


def test_check_labels_counts():
    assert labels.check_labels(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ValueError, match="3 names but the model has 2 classes"):
        labels.check_labels(["a", "b", "c"], 2)


def test_torchvision_enum_names_and_preprocessing():
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    names = labels.class_names(weights)
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    assert labels.class_names("Inception_V3_Weights.DEFAULT") == names
    assert labels.preprocessing(weights) == {"resize": 342, "crop": 299, "mean": labels.IMAGENET_MEAN,
                                             "std": labels.IMAGENET_STD, "channels": 3}
    with pytest.raises(ValueError, match="not a torchvision weights name"):
        labels.class_names("ResNet18_Weights.NOPE")


def test_models_without_metadata():
    model = torch.nn.Conv2d(3, 4, 3)
    assert labels.class_names(model) is None
    with pytest.raises(ValueError, match="declares no preprocessing"):
        labels.preprocessing(model)
    with pytest.raises(TypeError, match="weights enum"):
        labels.class_names(42)


def test_timm_config_names_and_preprocessing():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False)
    names = labels.class_names(model)
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]
    crop_pct = model.pretrained_cfg["crop_pct"]
    assert labels.preprocessing(model) == {"resize": int(224 / crop_pct), "crop": 224,
                                           "mean": labels.IMAGENET_MEAN, "std": labels.IMAGENET_STD, "channels": 3}
    assert labels.class_names(timm.create_model("resnet18", pretrained=False, num_classes=7)) is None
    config = dict(model.pretrained_cfg, label_names=["a", "b"], num_classes=2)
    assert labels.class_names(config) == ["a", "b"]
    assert labels.preprocessing(config)["crop"] == 224
