"""A synthetic anomaly-detection dataset in MVTec-AD's layout, made offline from scikit-image's bundled textures
and photos with pasted defects and their exact masks.

    python -m crane_hf.data.synthetic --output /tmp/synthetic --classes brick,grass,coins --seed 0

Each class is one source image (brick, grass, gravel, coins, ...). A normal image is a random crop of it (random
position, size, quarter turn, flip, brightness and contrast), resized to `image_size`. A defective image is a normal
one with one defect pasted: a scratch, a spot, a crack, a hole or a color stain; its mask is exactly the set of
pixels the defect painted. Everything is drawn from a generator seeded by (seed, class, split, defect, index), so a
given image does not depend on which other classes or counts were asked for, and the same arguments always give
the same files (byte for byte).

Layout written (plus a meta.json indexing the same files, and synthetic.json with the arguments)::

    <output>/<class>/train/good/000.png
    <output>/<class>/test/good/000.png
    <output>/<class>/test/<defect>/000.png
    <output>/<class>/ground_truth/<defect>/000_mask.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

try:
    import skimage.data
    from skimage import draw
    from skimage.transform import resize
except ImportError as error:  # an optional dependency: only the synthetic dataset (and the offline demo) need it
    raise ImportError(
        "The synthetic defect dataset needs scikit-image (its bundled textures and photos): "
        'pip install scikit-image (in a clone of crane_hf: pip install -e ".[synthetic]", the synthetic extra).'
    ) from error

from ..commands.cli_support import (
    local_path,
    one_line,
    run_command,
)  # `python -m crane_hf.data.synthetic` is a command
from ..io.atomic import atomic_output_dir, atomic_write_text
from .meta_json import write_meta_json
from .records import AnomalyRecord

# Class name -> scikit-image loader (all bundled with the scikit-image wheel: no download).
SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "brick": skimage.data.brick,
    "grass": skimage.data.grass,
    "gravel": skimage.data.gravel,
    "coins": skimage.data.coins,
    "moon": skimage.data.moon,
    "tissue": skimage.data.immunohistochemistry,
    "coffee": skimage.data.coffee,
    "cells": skimage.data.cell,
    "stars": skimage.data.hubble_deep_field,
    "retina": skimage.data.retina,
}
DEFAULT_CLASSES = ("brick", "grass", "gravel", "coins", "moon", "tissue")
DEFECTS = ("scratch", "spot", "crack", "hole", "color_stain")
MIN_DEFECT_FRACTION = 0.002  # of the image's pixels
STAIN_COLORS = np.array([[0.85, 0.1, 0.1], [0.1, 0.7, 0.15], [0.15, 0.25, 0.9], [0.9, 0.8, 0.1], [0.8, 0.1, 0.8]])


def load_source(name: str) -> np.ndarray:
    """The source image of class `name` as float32 RGB [H, W, 3] in [0, 1]."""
    if name not in SOURCES:
        raise ValueError(f"Unknown synthetic class {name!r}; choose from {', '.join(SOURCES)}.")
    array = np.asarray(SOURCES[name]())
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return (array[:, :, :3].astype(np.float32) / 255.0).clip(0.0, 1.0)


def sample_rng(seed: int, class_name: str, split: str, defect: str, index: int) -> np.random.Generator:
    """The generator of one image, keyed by names (stable across runs, class lists and counts)."""
    key = [int(seed), zlib.crc32(class_name.encode()), zlib.crc32(f"{split}/{defect}".encode()), int(index)]
    return np.random.default_rng(key)


def normal_image(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of `source` (50-80% of its short side), turned, flipped, jittered and resized: [size, size, 3]."""
    height, width = source.shape[:2]
    side = int(min(height, width) * rng.uniform(0.5, 0.8))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = np.rot90(source[top : top + side, left : left + side], k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = resize(crop, (size, size), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-0.04, 0.04)
    return image.clip(0.0, 1.0)


def _contrasting_value(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> float:
    """A gray level far from the image's local brightness under `mask`."""
    local = float(image[mask].mean()) if mask.any() else float(image.mean())
    return rng.uniform(0.85, 1.0) if local < 0.5 else rng.uniform(0.0, 0.15)


def _thicken(mask: np.ndarray, radius: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=draw_disk(radius)) if radius > 0 else mask


def draw_disk(radius: int) -> np.ndarray:
    """A boolean disk structuring element of the given radius."""
    grid = np.arange(-radius, radius + 1)
    return (grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2


def scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A thin curved line (quadratic Bezier) across 30-70% of the image."""
    mask = np.zeros((size, size), dtype=bool)
    start = rng.uniform(0.1, 0.9, 2) * size
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.3, 0.7) * size
    end = start + length * np.array([np.sin(angle), np.cos(angle)])
    control = (start + end) / 2 + rng.normal(0, 0.15 * size, 2)
    r0, c0, r1, c1, r2, c2 = (round(v) for v in (*start, *control, *end))
    rows, cols = draw.bezier_curve(r0, c0, r1, c1, r2, c2, weight=1.0, shape=mask.shape)
    mask[rows, cols] = True
    return _thicken(mask, int(rng.integers(0, 2)))


def spot_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A filled ellipse with radii 3-8% of the image side."""
    mask = np.zeros((size, size), dtype=bool)
    center = rng.uniform(0.15, 0.85, 2) * size
    radii = rng.uniform(0.03, 0.08, 2) * size
    rows, cols = draw.ellipse(*center, *radii, shape=mask.shape, rotation=rng.uniform(0, np.pi))
    mask[rows, cols] = True
    return mask


def crack_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A jagged random-walk line, sometimes with one branch."""
    mask = np.zeros((size, size), dtype=bool)

    def walk(point: np.ndarray, angle: float, steps: int) -> list[np.ndarray]:
        points = [point]
        for _ in range(steps):
            angle += rng.normal(0, 0.5)
            point = points[-1] + rng.uniform(0.02, 0.05) * size * np.array([np.sin(angle), np.cos(angle)])
            points.append(point.clip(0, size - 1))
        return points

    trunk = walk(rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0, 2 * np.pi), int(rng.integers(8, 16)))
    paths = [trunk]
    if rng.random() < 0.5:
        paths.append(walk(trunk[len(trunk) // 2], rng.uniform(0, 2 * np.pi), int(rng.integers(4, 8))))
    for path in paths:
        for a, b in itertools.pairwise(path):
            rows, cols = draw.line(*(round(v) for v in (*a, *b)))
            mask[rows, cols] = True
    return _thicken(mask, int(rng.integers(0, 2)))


def hole_geometry(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical hole (radii 4-10% of the side): its mask and the normalized radius (0 center, 1 rim)."""
    center = rng.uniform(0.15, 0.85, 2) * size
    radii = rng.uniform(0.04, 0.10, 2) * size
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = np.sqrt(((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2)
    return radius <= 1.0, radius


def stain_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular blob: the union of 3-6 overlapping ellipses."""
    mask = np.zeros((size, size), dtype=bool)
    center = rng.uniform(0.2, 0.8, 2) * size
    for _ in range(int(rng.integers(3, 7))):
        offset = rng.normal(0, 0.05 * size, 2)
        radii = rng.uniform(0.03, 0.08, 2) * size
        rows, cols = draw.ellipse(*(center + offset), *radii, shape=mask.shape, rotation=rng.uniform(0, np.pi))
        mask[rows, cols] = True
    return mask


def paste_defect(image: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste one defect into a copy of `image` [S, S, 3]; returns the image and the mask of the painted pixels."""
    size = image.shape[0]
    out = image.copy()
    for _ in range(100):
        if defect == "scratch":
            mask = scratch_mask(size, rng)
            out[mask] = _contrasting_value(image, mask, rng)
        elif defect == "spot":
            mask = spot_mask(size, rng)
            out[mask] = _contrasting_value(image, mask, rng) * rng.uniform(0.9, 1.0, 3)
        elif defect == "crack":
            mask = crack_mask(size, rng)
            out[mask] = rng.uniform(0.0, 0.12)
        elif defect == "hole":
            mask, radius = hole_geometry(size, rng)
            out[mask] = (0.03 + 0.2 * radius[mask] ** 2)[:, None]
        elif defect == "color_stain":
            mask = stain_mask(size, rng)
            alpha = rng.uniform(0.55, 0.75)
            color = STAIN_COLORS[int(rng.integers(0, len(STAIN_COLORS)))]
            out[mask] = (1 - alpha) * image[mask] + alpha * color
        else:
            raise ValueError(f"Unknown defect {defect!r}; choose from {', '.join(DEFECTS)}.")
        if mask.mean() >= MIN_DEFECT_FRACTION:
            return out.clip(0.0, 1.0), mask
        out = image.copy()
    raise RuntimeError(f"Could not draw a {defect} of at least {MIN_DEFECT_FRACTION:.1%} of a {size}px image.")


def synthetic_sample(
    source: np.ndarray, class_name: str, split: str, defect: str, index: int, image_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (uint8 RGB [S, S, 3]) and, for a defect, its mask (bool [S, S]); defect "good" means normal."""
    rng = sample_rng(seed, class_name, split, defect, index)
    image = normal_image(source, image_size, rng)
    mask = None
    if defect != "good":
        image, mask = paste_defect(image, defect, rng)
    return np.round(image * 255.0).astype(np.uint8), mask


def _save_png(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def generate_synthetic_dataset(
    output: str,
    classes: Sequence[str] = DEFAULT_CLASSES,
    defects: Sequence[str] = DEFECTS,
    image_size: int = 128,
    train_good: int = 4,
    test_good: int = 4,
    test_defective: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write the dataset (layout in the module docstring) to `output` atomically; returns `output`.

    Args:
        classes: source names (keys of `SOURCES`).
        defects: defect types (of `DEFECTS`); each is one test folder.
        image_size: side of the square images.
        train_good / test_good: normal images per class in train/good and test/good.
        test_defective: images per class and defect type.
        overwrite: replace an existing non-empty `output`.
        progress: show a tqdm bar over the images written.
    """
    unknown = [c for c in classes if c not in SOURCES] + [d for d in defects if d not in DEFECTS]
    if unknown:
        raise ValueError(
            f"Unknown class or defect {', '.join(map(repr, unknown))}; classes: {', '.join(SOURCES)}; "
            f"defects: {', '.join(DEFECTS)}."
        )
    if not classes or image_size < 16 or min(train_good, test_good, test_defective) < 0:
        raise ValueError("Need at least one class, image_size >= 16 and non-negative counts.")
    plan = [("train", "good", train_good), ("test", "good", test_good)]
    plan += [("test", defect, test_defective) for defect in defects]
    splits: dict[str, list[AnomalyRecord]] = {"train": [], "test": []}
    from tqdm.auto import tqdm

    total = len(classes) * sum(count for _, _, count in plan)
    bar = tqdm(total=total, desc="Writing synthetic images", unit="image", disable=not progress)
    with atomic_output_dir(output, overwrite=overwrite, command="data.synthetic") as staging:
        for class_name in classes:
            source = load_source(class_name)
            for split, defect, count in plan:
                for index in range(count):
                    image, mask = synthetic_sample(source, class_name, split, defect, index, image_size, seed)
                    image_path = f"{class_name}/{split}/{defect}/{index:03d}.png"
                    _save_png(image, os.path.join(staging, image_path))
                    mask_path = ""
                    if mask is not None:
                        mask_path = f"{class_name}/ground_truth/{defect}/{index:03d}_mask.png"
                        _save_png(mask.astype(np.uint8) * 255, os.path.join(staging, mask_path))
                    splits[split].append(
                        AnomalyRecord(image_path, mask_path, int(mask is not None), class_name, defect)
                    )
                    bar.update(1)
        bar.close()
        write_meta_json(staging, splits)
        arguments = {
            "classes": list(classes),
            "defects": list(defects),
            "image_size": image_size,
            "train_good": train_good,
            "test_good": test_good,
            "test_defective": test_defective,
            "seed": seed,
        }
        atomic_write_text(os.path.join(staging, "synthetic.json"), json.dumps(arguments, indent=2) + "\n")
    return output


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output", required=True, type=local_path, help="folder to create (must not exist unless --overwrite)"
    )
    parser.add_argument("--classes", type=_names, default=list(DEFAULT_CLASSES), help="comma-separated sources")
    parser.add_argument("--defects", type=_names, default=list(DEFECTS), help="comma-separated defect types")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train-good", type=int, default=4, help="normal training images per class")
    parser.add_argument("--test-good", type=int, default=4, help="normal test images per class")
    parser.add_argument("--test-defective", type=int, default=2, help="test images per class and defect type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return run_command(_run, parser.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        generate_synthetic_dataset(
            args.output,
            args.classes,
            args.defects,
            args.image_size,
            args.train_good,
            args.test_good,
            args.test_defective,
            args.seed,
            args.overwrite,
        )
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    total = len(args.classes) * (args.train_good + args.test_good + len(args.defects) * args.test_defective)
    print(f"Wrote {total} images of {len(args.classes)} classes to {args.output}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
