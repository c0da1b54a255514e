"""Retrain the digits vision tower (a tiny CLIPVisionModel) that MoE-LLaVA's demo uses.

    python training_scripts/train_vision_tower.py                      # into the moe_zoo cache (what the demo loads)
    python training_scripts/train_vision_tower.py --output_dir runs/digits-tower --epochs 60 --seed 1

The folder holds a ``CLIPVisionModel`` and its ``CLIPImageProcessor`` (load both with ``from_pretrained``) plus
``moe_zoo_asset.json`` with the metrics. It is written atomically: an existing folder is replaced only once training
has finished. The train/held-out split is ``moe_zoo.vision_tower.digits_split(seed)``; the QA data
(``moe_zoo.training.image_qa``) uses seed 0, so keep ``--seed 0`` for a tower used with it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moe_zoo.assets import cache_dir
from moe_zoo.atomic_io import atomic_directory
from moe_zoo.vision_tower import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_SEED,
    DIGITS_VISION_FOLDER,
    train_digits_vision_tower,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help=f"where to save (default: the moe_zoo cache, {cache_dir() / DIGITS_VISION_FOLDER})",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split, initialisation and shuffling seed")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--learning_rate", type=float, default=DEFAULT_LEARNING_RATE)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Train and save the tower; returns its metrics (``None`` in the non-main processes of a launcher).

    The loop is a plain single-process one (a few seconds on CPU), not a Trainer. Under ``torchrun`` /
    ``accelerate launch`` every process would train the same seeded tower and replace the folder in turn, so only
    the main process (``RANK`` 0, which both launchers set) trains and writes it; the others return at once.
    """
    args = parse_args(argv)
    output_dir = args.output_dir or cache_dir() / DIGITS_VISION_FOLDER
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    with atomic_directory(output_dir) as tmp:
        metrics = train_digits_vision_tower(
            tmp,
            epochs=args.epochs,
            seed=args.seed,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
        )
    print(
        f"held-out accuracy {metrics['heldout_accuracy']:.4f} on {metrics['num_heldout']} images "
        f"(patch features of hidden_states[-2]: {metrics['heldout_patch_accuracy']:.4f}); "
        f"trained in {metrics['train_seconds']} s; saved to {Path(output_dir).absolute()}"
    )
    return metrics


if __name__ == "__main__":
    main()
