"""The digits vision tower: data, split, preprocessing, the trained tower's features, the cache and the script.

The tower itself comes from the session fixture ``digits_vision_tower_dir`` (trained once, then cached); the cache
tests swap the trainer for a fake one so they never train.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPVisionModel

from moe_zoo import assets, vision_tower
from moe_zoo.atomic_io import temp_prefix
from moe_zoo.vision_tower import (
    DIGITS_VISION_FOLDER,
    digit_image,
    digit_pixel_values,
    digits_image_processor,
    digits_split,
    load_digit_images,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return load_digit_images()


# --- data and split -------------------------------------------------------------------------------------------------


def test_digit_images_are_the_sklearn_digits(digits):
    images, labels = digits
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert images.min() == 0 and images.max() == 255


def test_split_is_deterministic_stratified_and_disjoint(digits):
    _, labels = digits
    train_idx, heldout_idx = digits_split()
    again_train, again_heldout = digits_split(0)
    np.testing.assert_array_equal(train_idx, again_train)
    np.testing.assert_array_equal(heldout_idx, again_heldout)
    assert not set(train_idx.tolist()) & set(heldout_idx.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, heldout_idx])), np.arange(len(labels)))
    for label in range(10):
        in_class = int((labels == label).sum())
        assert int((labels[heldout_idx] == label).sum()) == round(0.2 * in_class)
    other_train, _ = digits_split(1)
    assert not np.array_equal(train_idx, other_train)


# --- preprocessing --------------------------------------------------------------------------------------------------


def test_pixel_values_are_the_documented_preprocessing(digits):
    images, _ = digits
    pixels = digit_pixel_values(images[:5])
    assert pixels.shape == (5, 3, 32, 32) and pixels.dtype == torch.float32
    expected = np.kron(images[:5].astype(np.float64), np.ones((4, 4))) / 255 * 2 - 1
    np.testing.assert_allclose(pixels[:, 0].numpy(), expected, atol=1e-6)
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])


def _processed(processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def test_saved_processor_reproduces_the_training_pixels_exactly(digits_vision_tower_dir, digits):
    images, _ = digits
    for processor in (
        CLIPImageProcessor.from_pretrained(digits_vision_tower_dir),
        AutoImageProcessor.from_pretrained(digits_vision_tower_dir),
    ):
        for index in (0, 5, 1000, 1796):
            expected = digit_pixel_values(images[index : index + 1])[0]
            assert torch.equal(_processed(processor, digit_image(images[index])), expected)
            assert torch.equal(_processed(processor, Image.fromarray(images[index])), expected)  # grayscale PIL
            assert torch.equal(_processed(processor, np.repeat(images[index][..., None], 3, axis=-1)), expected)
    batch = CLIPImageProcessor.from_pretrained(digits_vision_tower_dir)(
        images=[digit_image(image) for image in images[:8]], return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(batch, digit_pixel_values(images[:8]))


def test_in_memory_processor_matches_the_saved_one(digits_vision_tower_dir):
    saved = CLIPImageProcessor.from_pretrained(digits_vision_tower_dir).to_dict()
    fresh = digits_image_processor().to_dict()
    assert {key: saved[key] for key in fresh} == fresh


# --- the trained tower ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower(digits_vision_tower_dir):
    return CLIPVisionModel.from_pretrained(digits_vision_tower_dir).eval()


@pytest.fixture(scope="module")
def features(tower, digits):
    """The tower's pooled output and mean ``hidden_states[-2]`` patch token for every digit."""
    images, _ = digits
    with torch.no_grad():
        out = tower(pixel_values=digit_pixel_values(images), output_hidden_states=True)
    return {"pooler_output": out.pooler_output, "patch_tokens_layer_-2": out.hidden_states[-2][:, 1:].mean(dim=1)}


def test_tower_config_and_marker(digits_vision_tower_dir, tower):
    config = tower.config
    assert (config.image_size, config.patch_size, config.hidden_act) == (32, 8, "quick_gelu")
    with torch.no_grad():
        tokens = tower(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state
    assert tokens.shape == (1, 17, config.hidden_size)  # 16 patches + CLS
    marker = json.loads((digits_vision_tower_dir / assets.COMPLETE_MARKER).read_text())
    assert marker["recipe_version"] == vision_tower.RECIPE_VERSION
    assert marker["metrics"]["num_train"] + marker["metrics"]["num_heldout"] == 1797
    assert marker["metrics"]["heldout_accuracy"] > 0.9


def _nearest_centroid_accuracy(features: torch.Tensor, labels: np.ndarray) -> float:
    train_idx, heldout_idx = digits_split()
    labels = torch.from_numpy(labels)
    features = torch.nn.functional.normalize(features - features[train_idx].mean(0), dim=-1)
    centroids = torch.stack([features[train_idx][labels[train_idx] == c].mean(0) for c in range(10)])
    predicted = (features[heldout_idx] @ centroids.T).argmax(-1)
    return (predicted == labels[heldout_idx]).float().mean().item()


@pytest.mark.parametrize("which", ["pooler_output", "patch_tokens_layer_-2"])
def test_features_separate_the_classes_on_heldout_images(features, digits, which):
    accuracy = _nearest_centroid_accuracy(features[which], digits[1])
    print(f"held-out nearest-centroid accuracy on {which}: {accuracy:.3f}")
    assert accuracy > 0.85  # chance is 0.1; the trained tower gives about 0.95, an untrained one about 0.3


def test_untrained_tower_features_are_much_worse(digits):
    """The probe measures what training taught: a fresh tower of the same shape does far worse."""
    images, labels = digits
    torch.manual_seed(0)
    fresh = CLIPVisionModel(vision_tower.digits_vision_config()).eval()
    with torch.no_grad():
        pooled = fresh(pixel_values=digit_pixel_values(images)).pooler_output
    accuracy = _nearest_centroid_accuracy(pooled, labels)
    print(f"held-out nearest-centroid accuracy of an untrained tower: {accuracy:.3f}")
    assert accuracy < 0.8


# --- the cache (with a fake trainer) --------------------------------------------------------------------------------


class FakeTrainer:
    """Stands in for train_digits_vision_tower: writes a marker (unless told to fail) and counts calls."""

    def __init__(self, fail: bool = False, recipe_version: int = vision_tower.RECIPE_VERSION):
        self.fail, self.recipe_version, self.calls = fail, recipe_version, 0

    def __call__(self, output_dir, **kwargs):
        self.calls += 1
        (Path(output_dir) / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("interrupted")
        marker = {"recipe_version": self.recipe_version}
        (Path(output_dir) / assets.COMPLETE_MARKER).write_text(json.dumps(marker))
        return {}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    return tmp_path


def _install(monkeypatch, trainer: FakeTrainer) -> FakeTrainer:
    monkeypatch.setattr(vision_tower, "train_digits_vision_tower", trainer)
    return trainer


def test_training_runs_once_then_the_cache_is_reused(empty_cache, monkeypatch):
    trainer = _install(monkeypatch, FakeTrainer())
    path = vision_tower.digits_vision_tower_path(show_progress=False)
    assert path == empty_cache / DIGITS_VISION_FOLDER and assets.is_complete(path)
    assert vision_tower.digits_vision_tower_path(show_progress=False) == path
    assert trainer.calls == 1


def test_incomplete_or_outdated_folders_are_not_reused(empty_cache, monkeypatch):
    target = empty_cache / DIGITS_VISION_FOLDER
    target.mkdir()
    (target / "config.json").write_text("{}")  # no completion marker: an interrupted non-atomic copy
    trainer = _install(monkeypatch, FakeTrainer())
    vision_tower.digits_vision_tower_path(show_progress=False)
    assert trainer.calls == 1 and assets.is_complete(target)

    marker = json.loads((target / assets.COMPLETE_MARKER).read_text())
    marker["recipe_version"] = vision_tower.RECIPE_VERSION - 1
    (target / assets.COMPLETE_MARKER).write_text(json.dumps(marker))
    vision_tower.digits_vision_tower_path(show_progress=False)
    assert trainer.calls == 2
    assert json.loads((target / assets.COMPLETE_MARKER).read_text())["recipe_version"] == vision_tower.RECIPE_VERSION


def test_interrupted_training_leaves_nothing_that_counts_as_cached(empty_cache, monkeypatch):
    _install(monkeypatch, FakeTrainer(fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        vision_tower.digits_vision_tower_path(show_progress=False)
    target = empty_cache / DIGITS_VISION_FOLDER
    assert not target.exists()
    assert not list(empty_cache.glob(temp_prefix(target) + "*"))
    trainer = _install(monkeypatch, FakeTrainer())
    vision_tower.digits_vision_tower_path(show_progress=False)
    assert trainer.calls == 1 and assets.is_complete(target)


# --- real training, briefly, through the script ---------------------------------------------------------------------


def test_training_script_trains_saves_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "training_scripts"))
    sys.modules.pop("train_vision_tower", None)
    from train_vision_tower import main

    out = tmp_path / "tower"
    metrics = main(["--output_dir", str(out), "--epochs", "1", "--seed", "0"])
    assert set(metrics) >= {"heldout_accuracy", "heldout_patch_accuracy", "train_seconds", "num_train", "num_heldout"}
    assert (metrics["num_train"], metrics["num_heldout"]) == (1438, 359)
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0
    assert assets.is_complete(out)
    assert "held-out accuracy" in capsys.readouterr().out
    CLIPVisionModel.from_pretrained(out)
    CLIPImageProcessor.from_pretrained(out)
