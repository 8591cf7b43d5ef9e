"""Small real cases for the engine tests: NRRD volumes with a bright blob and its labelmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

# A tiny but real configuration: ViT (4 blocks, width 48) + UPerNet, Med-Adapters, 4x32x32 crops.
TINY_TRAIN = ["--arch", "vit_upernet", "--backbone", "vit_tiny_patch16_224",
              "--backbone-args", "depth=4,embed_dim=48,num_heads=2,patch_size=8", "--decoder-width", "16",
              "--weights", "none", "--crop", "4x32x32", "--batch", "2", "--device", "cpu", "--precision", "fp32"]


def blob_volume(shape=(8, 40, 40), centre=None, radius=7.0, seed=0, spacing=(1.2, 1.0, 1.0),
                origin=(0.0, 0.0, 0.0)) -> tuple[sitk.Image, sitk.Image]:
    """An MR-like image (noise + bright ellipsoid) and its labelmap (1 inside)."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    centre = centre or (d / 2, h / 2, w / 2)
    z, y, x = np.mgrid[:d, :h, :w]
    inside = ((z - centre[0]) / (radius / 2.5)) ** 2 + ((y - centre[1]) / radius) ** 2 + ((x - centre[2]) / radius) ** 2 < 1
    image = rng.normal(100.0, 10.0, shape) + 80.0 * inside
    img = sitk.GetImageFromArray(image.astype(np.float32))
    lab = sitk.GetImageFromArray(inside.astype(np.uint8))
    for im in (img, lab):
        im.SetSpacing(spacing[::-1])
        im.SetOrigin(origin)
    return img, lab


def write_blob_case(folder: Path, name: str, seed: int, **kwargs) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    img, lab = blob_volume(seed=seed, **kwargs)
    image_path, label_path = folder / f"{name}.nrrd", folder / f"{name}-label.nrrd"
    sitk.WriteImage(img, str(image_path), True)
    sitk.WriteImage(lab, str(label_path), True)
    return image_path, label_path


def make_blob_library(cli, root: Path, n_train: int = 2, n_test: int = 1) -> Path:
    library = root / "library"
    for i in range(n_train + n_test):
        shift = (0, 4 * (i % 2) - 2, 3 * (i % 3) - 3)
        image, label = write_blob_case(root / "src", f"case{i}", seed=i,
                                       centre=(4 + shift[0], 20 + shift[1], 20 + shift[2]))
        split = "train" if i < n_train else "test"
        status, events = cli(["cases", "add", "--library", str(library), "--image", str(image), "--label", str(label),
                              "--modality", "MR", "--split", split, "--id", f"case{i}"])
        assert status == 0, events
    return library
