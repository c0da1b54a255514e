"""A tiny CLIP vision tower that the project trains itself on scikit-learn's handwritten digits.

No pretrained vision encoder can be had offline, so MoE-LLaVA's demo uses this one: a transformers
``CLIPVisionModel`` (32x32 images, 8x8 patches = 16 patch tokens + CLS, quick_gelu) trained as a digit classifier
(the tower plus a linear head on ``pooler_output``; the head is discarded) on ``sklearn.datasets.load_digits()``
(1,797 8x8 grayscale images, 10 classes; AdamW, learning rate 5e-3 with warmup and cosine decay, label smoothing
0.1, 40 epochs of batch 64). It trains in about half a minute on 2 idle CPU cores, reaches 96% held-out
accuracy, and is cached with a ``CLIPImageProcessor`` that reproduces its preprocessing in
``cache_dir() / "digits-clip-vision"``.

Preprocessing (the same numbers whether done by :func:`digit_pixel_values` or by the saved image processor):

1. ``load_digits`` pixel values 0..16 become uint8 ``rint(v * 255 / 16)`` (:func:`load_digit_images`);
2. the 8x8 image is upsampled 4x with nearest-neighbour resampling to 32x32 and replicated to 3 (RGB) channels;
3. ``x / 255``, then normalised with mean 0.5 and std 0.5 per channel (so values lie in [-1, 1]).

The image processor accepts PIL images (any mode; converted to RGB) and ``(8, 8, 3)`` / ``(3, 8, 8)`` uint8 arrays.
Plain 2-D ``(8, 8)`` arrays are ambiguous to transformers' image utilities: wrap them with
``PIL.Image.fromarray(array)`` or use :func:`digit_image` first.

The train/held-out split (:func:`digits_split`) is fixed, seeded and stratified; the tower never sees a held-out
image, so question answering on held-out images (``moe_zoo.training.image_qa``) measures generalisation.

Besides the classification loss on ``pooler_output``, training adds the same loss through a second linear head on
the mean of the patch tokens of ``hidden_states[-2]``: that is exactly what LLaVA feeds its projector
(``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"`` drops the CLS token), so those features
carry the digit too. Both heads are discarded.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import PILImageResampling

from .assets import COMPLETE_MARKER, cache_dir, is_complete
from .atomic_io import atomic_directory, remove_stale_temp_dirs

DIGITS_VISION_FOLDER = "digits-clip-vision"
"""Name of the cached tower's folder inside :func:`moe_zoo.assets.cache_dir`."""
RECIPE_VERSION = 1
"""Bumped whenever the data, preprocessing or training recipe changes; a cached tower of another version is retrained."""

IMAGE_SIZE = 32
PATCH_SIZE = 8
UPSAMPLE = IMAGE_SIZE // 8
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
HELDOUT_FRACTION = 0.2
NUM_CLASSES = 10

DEFAULT_EPOCHS = 40
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 5e-3


def digits_vision_config() -> CLIPVisionConfig:
    """The tower's architecture: 32x32 inputs, 8x8 patches (16 + CLS tokens), width 64, 3 layers, 4 heads."""
    return CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        projection_dim=64,
    )


def digits_image_processor() -> CLIPImageProcessorPil:
    """A CLIP image processor that turns an 8x8 digit image into exactly the pixels the tower was trained on.

    It is transformers' PIL backend of ``CLIPImageProcessor`` (torchvision is not needed); it saves as
    ``"image_processor_type": "CLIPImageProcessor"`` and ``AutoImageProcessor`` / ``CLIPImageProcessor`` load it.
    """
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=PILImageResampling.NEAREST,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


# --- data -----------------------------------------------------------------------------------------------------------


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images, labels)``: uint8 ``(1797, 8, 8)`` (0 = background, 255 = ink) and int64.

    The dataset's 0..16 values are mapped to ``rint(v * 255 / 16)``. The files ship inside scikit-learn.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digit_image(image: np.ndarray):
    """An ``(8, 8)`` uint8 digit as a ``PIL.Image`` in RGB mode (what the image processor and QA examples use)."""
    from PIL import Image

    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")  # 2-D uint8 -> mode "L"


def digits_split(seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified split of :func:`load_digit_images`: sorted ``(train_idx, heldout_idx)``, 80 / 20.

    Within each class the indices are permuted with ``numpy.random.default_rng(seed)`` (classes in order 0..9) and the
    first ``round(0.2 * class size)`` are held out. The vision tower and the MoE-LLaVA training data use only
    ``train_idx``; the same seed always gives the same split.
    """
    _, labels = load_digit_images()
    rng = np.random.default_rng(seed)
    heldout = []
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        heldout.append(members[: int(round(HELDOUT_FRACTION * len(members)))])
    heldout_idx = np.sort(np.concatenate(heldout))
    train_idx = np.setdiff1d(np.arange(len(labels)), heldout_idx)
    return train_idx, heldout_idx


def digit_pixel_values(images: np.ndarray) -> torch.Tensor:
    """``(N, 8, 8)`` uint8 digits to float32 ``(N, 3, 32, 32)`` pixel values, as :func:`digits_image_processor`."""
    images = np.asarray(images, dtype=np.uint8)
    up = images.repeat(UPSAMPLE, axis=-2).repeat(UPSAMPLE, axis=-1)
    scaled = (up.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, dtype=np.float32)[:, None, None]
    pixels = (scaled[:, None] - mean) / std  # broadcast the single gray channel to 3 channels
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))


# --- training -------------------------------------------------------------------------------------------------------


class _DigitClassifier(nn.Module):
    """The tower with two linear heads: on ``pooler_output`` and on the mean patch token of ``hidden_states[-2]``."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.tower = CLIPVisionModel(config)
        self.head = nn.Linear(config.hidden_size, NUM_CLASSES)
        self.patch_head = nn.Linear(config.hidden_size, NUM_CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        patch_features = out.hidden_states[-2][:, 1:].mean(dim=1)
        return self.head(out.pooler_output), self.patch_head(patch_features)


@torch.no_grad()
def _accuracy(model: _DigitClassifier, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits, patch_logits = model(pixels)
    return (
        (logits.argmax(-1) == labels).float().mean().item(),
        (patch_logits.argmax(-1) == labels).float().mean().item(),
    )


def train_digits_vision_tower(
    output_dir: str | Path,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    show_progress: bool = True,
) -> dict:
    """Train the digit vision tower on the train split and save it with its image processor into ``output_dir``.

    ``output_dir`` receives ``config.json`` + ``model.safetensors`` (a ``CLIPVisionModel``),
    ``preprocessor_config.json`` (a ``CLIPImageProcessor``) and, written last, ``moe_zoo_asset.json`` with the
    recipe and the metrics. Returns the metrics: ``heldout_accuracy`` (the classifier on ``pooler_output``),
    ``heldout_patch_accuracy`` (the head on the mean ``hidden_states[-2]`` patch token), ``train_accuracy``,
    ``train_seconds`` and the sizes of the split. The data split is always :func:`digits_split` with ``seed``;
    ``seed`` also fixes initialisation and shuffling, so a run is reproducible on one machine.
    """
    output_dir = Path(output_dir)
    start = time.perf_counter()
    images, labels = load_digit_images()
    train_idx, heldout_idx = digits_split(seed)
    train_pixels, train_labels = digit_pixel_values(images[train_idx]), torch.from_numpy(labels[train_idx])
    heldout_pixels, heldout_labels = digit_pixel_values(images[heldout_idx]), torch.from_numpy(labels[heldout_idx])

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG state
        torch.manual_seed(seed)
        model = _DigitClassifier(digits_vision_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))),
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    _progress(show_progress, f"training the digits vision tower: {len(train_idx)} images, {epochs} epochs")
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(train_idx)))
        total = 0.0
        for batch in order.split(batch_size):
            logits, patch_logits = model(train_pixels[batch])
            loss = loss_fn(logits, train_labels[batch]) + loss_fn(patch_logits, train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        if show_progress and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            accuracy, _ = _accuracy(model, heldout_pixels, heldout_labels)
            _progress(
                True,
                f"  epoch {epoch + 1}/{epochs}: loss {total / len(train_idx):.3f}, held-out accuracy {accuracy:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
            )

    train_accuracy, _ = _accuracy(model, train_pixels, train_labels)
    heldout_accuracy, heldout_patch_accuracy = _accuracy(model, heldout_pixels, heldout_labels)
    metrics = {
        "heldout_accuracy": heldout_accuracy,
        "heldout_patch_accuracy": heldout_patch_accuracy,
        "train_accuracy": train_accuracy,
        "train_seconds": round(time.perf_counter() - start, 1),
        "num_train": len(train_idx),
        "num_heldout": len(heldout_idx),
        "epochs": epochs,
        "seed": seed,
    }

    output_dir.mkdir(parents=True, exist_ok=True)
    tower = model.tower.eval()
    tower.save_pretrained(output_dir)
    digits_image_processor().save_pretrained(output_dir)
    _write_marker(output_dir, metrics, batch_size=batch_size, learning_rate=learning_rate)
    _progress(
        show_progress,
        f"held-out accuracy {heldout_accuracy:.3f} (patch features {heldout_patch_accuracy:.3f}), "
        f"trained in {metrics['train_seconds']} s; saved to {output_dir}",
    )
    return metrics


def _write_marker(out_dir: Path, metrics: dict, **recipe) -> None:
    """Record the recipe and metrics; written last, its presence marks the folder as complete."""
    import sklearn

    info = {
        "asset": "digits-clip-vision",
        "recipe_version": RECIPE_VERSION,
        "data": "sklearn.datasets.load_digits",
        "split": f"digits_split(seed={metrics['seed']}), {HELDOUT_FRACTION:.0%} held out per class",
        "metrics": metrics,
        "recipe": recipe,
        "scikit_learn_version": sklearn.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _is_current(folder: Path) -> bool:
    """A complete folder trained with this :data:`RECIPE_VERSION`."""
    if not is_complete(folder):
        return False
    try:
        return json.loads((folder / COMPLETE_MARKER).read_text()).get("recipe_version") == RECIPE_VERSION
    except (OSError, ValueError):
        return False


def digits_vision_tower_path(show_progress: bool = True) -> Path:
    """A local folder with the trained digits ``CLIPVisionModel`` and its ``CLIPImageProcessor``.

    Trains it on first use (about half a minute on 2 idle CPU cores, progress on stderr) into
    ``cache_dir() / "digits-clip-vision"``, written atomically; later calls return the cached folder at once. A
    folder without the completion marker, or from another :data:`RECIPE_VERSION`, is retrained.

    Example:
    ```python
    >>> path = digits_vision_tower_path()
    >>> tower = CLIPVisionModel.from_pretrained(path)
    >>> processor = CLIPImageProcessor.from_pretrained(path)
    ```
    """
    target = cache_dir() / DIGITS_VISION_FOLDER
    if _is_current(target):
        return target
    remove_stale_temp_dirs(target)
    _progress(show_progress, f"Training the digits vision tower into {target} (one time, about half a minute)")
    # keep_existing: if a concurrent process finished first, keep its folder and drop ours.
    with atomic_directory(target, keep_existing=_is_current) as tmp:
        train_digits_vision_tower(tmp, show_progress=show_progress)
    _progress(show_progress, f"Digits vision tower ready in {target}")
    return target


def _progress(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[moe_zoo] {message}", file=sys.stderr, flush=True)


__all__ = [
    "DIGITS_VISION_FOLDER",
    "RECIPE_VERSION",
    "digit_image",
    "digit_pixel_values",
    "digits_image_processor",
    "digits_split",
    "digits_vision_config",
    "digits_vision_tower_path",
    "load_digit_images",
    "train_digits_vision_tower",
]
