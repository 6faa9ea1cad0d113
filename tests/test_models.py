"""Architectures, their options and seeds, the torchvision path, and checkpoints."""

import pytest
import torch
import torchvision
from torch import nn

from pipeline import KDError
from pipeline.models import (ARCHITECTURES, arch_error, build_model, load_checkpoint, save_checkpoint,
                             weights_fingerprint)

DIGITS = (1, 28)  # (in_channels, image_size) of MNIST-like data
CIFAR = (3, 32)
INPUT = {"cnn": DIGITS, "tiny_cnn": DIGITS, "mlp": DIGITS}  # everything else: CIFAR


def logits(model: nn.Module, in_channels: int, image_size: int, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(batch, in_channels, image_size, image_size))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "mobilenet_v3_small"])
def test_every_architecture_maps_images_to_logits(arch):
    in_channels, image_size = INPUT.get(arch, CIFAR)
    model = build_model(arch, in_channels, 7, image_size=image_size, seed=0)
    assert logits(model, in_channels, image_size).shape == (2, 7)


def test_cifar_nets_and_torchvision_models_also_take_one_channel_digits():
    for arch in ("resnet8", "wrn_16_1", "resnet18"):
        assert logits(build_model(arch, 1, 10, image_size=28), *DIGITS).shape == (2, 10)


def test_cnn_and_tiny_cnn_initialise_as_before():
    """Regression fixture: the seed-0 weights these two had before the architecture list grew."""
    assert weights_fingerprint(build_model("cnn", 1, 10, seed=0)) == \
        "b890b95592ed1f608319da71d4537d228ad39be7e0c7ec3ba325bf636e0a9e3f"
    assert weights_fingerprint(build_model("tiny_cnn", 1, 10, seed=0)) == \
        "aef6b870d4926d1cda91b8e7abaee89dd090323bb30090b09edd680653abb054"


@pytest.mark.parametrize("arch", ["cnn", "mlp", "resnet20", "wrn_16_1", "resnet18", "mobilenet_v3_small"])
def test_same_seed_same_weights_other_seed_other_weights(arch):
    in_channels, image_size = INPUT.get(arch, CIFAR)
    rng = torch.get_rng_state()
    a, b, c = (build_model(arch, in_channels, 10, image_size=image_size, seed=s) for s in (1, 1, 2))
    assert same_weights(a, b) and not same_weights(a, c)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched


# Parameters at 100 classes, as the distillation literature (CRD, RepDistiller) reports them.
PUBLISHED = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet110": 1.7e6,
             "resnet8x4": 1.2e6, "resnet32x4": 7.4e6, "wrn_16_2": 0.70e6, "wrn_40_2": 2.2e6}


def test_parameter_counts_match_the_literature():
    counts = {arch: sum(p.numel() for p in build_model(arch, 3, 100).parameters()) for arch in PUBLISHED}
    print("\n" + "\n".join(f"{arch:11s} {n:>10,d}  (published {PUBLISHED[arch]:,.0f})" for arch, n in counts.items()))
    for arch, n in counts.items():
        assert abs(n - PUBLISHED[arch]) <= 0.05 * PUBLISHED[arch], (arch, n)


def test_cifar_resnets_have_repdistillers_layout():
    """resnet20: 3 stages of 3 BasicBlocks at 16-32-64 after a 16-channel 3x3 stride-1 stem; 1x1 conv + BN
    shortcuts where the shape changes. resnet8x4: stem 32, stages 64-128-256."""
    model = build_model("resnet20", 3, 100)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.out_channels) == ((3, 3), (1, 1), 16)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert [stage[0].conv2.out_channels for stage in (model.layer1, model.layer2, model.layer3)] == [16, 32, 64]
    assert model.layer1[0].downsample is None
    conv, bn = model.layer2[0].downsample
    assert (conv.kernel_size, conv.stride, type(bn)) == ((1, 1), (2, 2), nn.BatchNorm2d)
    wide = build_model("resnet8x4", 3, 100)
    assert [wide.conv1.out_channels, wide.layer1[0].conv2.out_channels, wide.fc.in_features] == [32, 64, 256]


def test_mlp_flattens_the_image_and_takes_hintons_options():
    default = build_model("mlp", 1, 10, image_size=28)
    assert [(m.in_features, m.out_features) for m in default.modules() if isinstance(m, nn.Linear)] == \
        [(784, 64), (64, 10)]
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in default.modules())
    teacher = build_model("mlp", 1, 10, {"hidden_sizes": [1200, 1200], "dropout": 0.5, "input_dropout": 0.2}, 28)
    assert [(m.in_features, m.out_features) for m in teacher.modules() if isinstance(m, nn.Linear)] == \
        [(784, 1200), (1200, 1200), (1200, 10)]
    assert [m.p for m in teacher.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.5, 0.5]


def test_mlp_needs_the_image_size():
    with pytest.raises(KDError, match="'mlp' needs image_size"):
        build_model("mlp", 1, 10)


def test_wrn_and_torchvision_options_reach_the_model():
    wrn = build_model("wrn_16_1", 3, 10, {"dropout": 0.3})
    assert {block.dropout for block in wrn.modules() if hasattr(block, "convShortcut")} == {0.3}
    mobile = build_model("mobilenet_v3_small", 3, 10, {"dropout": 0.5}, image_size=32)
    assert [m.p for m in mobile.classifier if isinstance(m, nn.Dropout)] == [0.5]


def test_small_images_get_the_cifar_stem_same_as_the_hand_written_resnet18():
    """resnet18 used to be written out by hand: torchvision's ResNet-18, conv1 a 3x3 stride-1 conv, no max-pool."""
    model = build_model("resnet18", 3, 10, image_size=32, seed=4)
    torch.manual_seed(4)
    by_hand = torchvision.models.resnet18(num_classes=10)
    by_hand.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    by_hand.maxpool = nn.Identity()
    assert same_weights(model, by_hand) and str(model) == str(by_hand)


def test_large_images_keep_torchvisions_stem():
    model = build_model("resnet18", 3, 10, image_size=96, seed=4)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(model.maxpool, nn.MaxPool2d)
    torch.manual_seed(4)
    assert same_weights(model, torchvision.models.get_model("resnet18", weights=None, num_classes=10))
    assert logits(model, 3, 96).shape == (2, 10)


def test_the_stem_takes_in_channels():
    large = build_model("mobilenet_v3_small", 1, 10, image_size=96)
    stem = large.features[0][0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (1, 16, (3, 3), (2, 2))
    small = build_model("efficientnet_b0", 1, 10, image_size=28).features[0][0]
    assert (small.in_channels, small.stride, small.padding, small.bias) == (1, (1, 1), (1, 1), None)


@pytest.mark.parametrize("arch, options, named", [
    ("mlp", {"hidden": [8]}, ["'hidden'", "hidden_sizes, dropout, input_dropout"]),
    ("resnet20", {"dropout": 0.1}, ["'dropout'", "its options are: none"]),
    ("wrn_40_2", {"dropRate": 0.1}, ["'dropRate'", "its options are: dropout"]),
    ("resnet18", {"weights": "DEFAULT"}, ["'weights'"]),  # never download weights
    ("mlp", {"image_size": 32}, ["'image_size'"]),  # build_model's own argument, not an option
])
def test_an_unknown_option_is_an_error_naming_it_and_the_allowed_ones(arch, options, named):
    message = arch_error(arch, options)
    for text in [repr(arch), *named]:
        assert text in message
    with pytest.raises(KDError) as error:
        build_model(arch, 3, 10, options, image_size=32)
    assert str(error.value) == message


def test_an_unknown_architecture_is_an_error_listing_ours_and_pointing_to_torchvision():
    message = arch_error("resnet19", {})
    assert "'resnet19'" in message and "resnet20" in message and "wrn_40_2" in message and "torchvision" in message
    with pytest.raises(KDError, match="unknown architecture 'resnet19'"):
        build_model("resnet19", 3, 10)


def test_arch_error_accepts_known_names_and_options_without_building():
    assert arch_error("mlp", {"hidden_sizes": [8], "dropout": 0.1}) is None
    assert arch_error("resnet110", None) is None
    assert arch_error("efficientnet_b0", {"dropout": 0.3}) is None  # torchvision judges its own options
    assert "must be a mapping" in arch_error("mlp", ["hidden_sizes"])


def test_an_option_torchvision_rejects_is_a_clear_error():
    assert arch_error("resnet18", {"nonsense": 1}) is None
    with pytest.raises(KDError, match="'resnet18' cannot be built with options.*nonsense"):
        build_model("resnet18", 3, 10, {"nonsense": 1}, image_size=32)


@pytest.mark.parametrize("arch, options, in_channels, image_size", [
    ("mlp", {"hidden_sizes": [32, 16], "dropout": 0.5, "input_dropout": 0.2}, 1, 28),
    ("mobilenet_v3_small", {"dropout": 0.3}, 1, 28),
    ("resnet18", {}, 3, 96),
])
def test_a_checkpoint_rebuilds_the_same_model_from_the_file_alone(tmp_path, arch, options, in_channels, image_size):
    model = build_model(arch, in_channels, 10, options, image_size, seed=0)
    save_checkpoint(model, arch, in_channels, 10, tmp_path / "m.pt", options, image_size)
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert (ckpt["arch"], ckpt["options"], ckpt["image_size"]) == (arch, options, image_size)
    assert same_weights(loaded, model) and str(loaded) == str(model) and not loaded.training
    assert not (tmp_path / "m.pt.partial").exists()


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_a_checkpoint_from_before_options_were_recorded_still_loads(tmp_path, arch):
    """Old checkpoints hold arch, in_channels, num_classes, state_dict only; resnet18 then had the CIFAR stem."""
    model = build_model(arch, 3, 10, image_size=32)
    torch.save({"arch": arch, "in_channels": 3, "num_classes": 10, "state_dict": model.state_dict()},
               tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt")
    assert same_weights(loaded, model)


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint not found"),
    (b"not a checkpoint", "is a text file (it starts 'not a checkpoint'), not a checkpoint"),
    (b"\x80\x02garbage", "not a readable PyTorch checkpoint"),
    ({"state_dict": {}}, "checkpoint must be a dict with keys"),
    ({"arch": "cnn", "in_channels": 1, "num_classes": 10, "state_dict": {"w": torch.zeros(1)}},
     "does not fit architecture 'cnn'"),
    ({"arch": "resnet19", "in_channels": 1, "num_classes": 10, "state_dict": {}}, "unknown architecture 'resnet19'"),
    ({"arch": "mlp", "options": {"hidden": [8]}, "image_size": 28, "in_channels": 1, "num_classes": 10,
      "state_dict": {}}, "has no option 'hidden'"),
])
def test_a_bad_checkpoint_is_a_clear_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(KDError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)
