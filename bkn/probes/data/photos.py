"""Crops of scikit-learn's two bundled sample photographs (ships with scikit-learn; nothing is downloaded).

``sklearn.datasets.load_sample_images()`` holds two 427x640 RGB photographs, ``china.jpg``
(a temple) and ``flower.jpg``. :func:`load_photos` cuts ``count`` square crops of
``size`` pixels at seeded random positions (half from each photograph), optionally from
the photographs downscaled by ``scale`` first (more content per crop), rotates each crop
by a seeded random multiple of 90 degrees, and standardises every colour channel with
the mean and standard deviation of all crops.

Labels, for a short training run: ``4 * photo + quarter_turns`` (8 classes: which
photograph, and how the crop was rotated - a self-supervised task in the manner of
rotation prediction, Gidaris et al. 2018), since the photographs carry no other labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("china", "flower")
NUM_CLASSES = 4 * len(PHOTOS)


def load_photos(
    size: int = 32, count: int = 1024, scale: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops ``(count, 3, size, size)`` and labels ``(count,)`` (int64, ``4 * photo + quarter turns``).

    Args:
        size: side of a crop in pixels (of the possibly downscaled photograph).
        count: number of crops, split evenly between the two photographs (must be even).
        scale: downscale factor in (0, 1] applied to the photographs before cropping (area
            interpolation); 0.5 gives 213x320 photographs.
        seed: seed of the crop positions and rotations.
    """
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"load_photos: size must be an int >= 2, got {size!r}")
    if not isinstance(count, int) or count < 2 or count % 2:
        raise ValueError(f"load_photos: count must be a positive even int (half per photograph), got {count!r}")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"load_photos: scale must lie in (0, 1], got {scale!r}")
    from sklearn.datasets import load_sample_images  # a heavy import, only when needed

    photos = [torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0 for img in load_sample_images().images]
    if scale != 1.0:
        photos = [F.interpolate(p.unsqueeze(0), scale_factor=scale, mode="area").squeeze(0) for p in photos]
    height, width = photos[0].shape[1:]
    if size > min(height, width):
        raise ValueError(f"load_photos: size {size} is larger than the photographs ({height}x{width} at scale {scale})")
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for index, photo in enumerate(photos):
        h, w = photo.shape[1:]
        for _ in range(count // 2):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            turns = int(rng.integers(0, 4))
            crops.append(torch.rot90(photo[:, top : top + size, left : left + size], turns, dims=(1, 2)))
            labels.append(4 * index + turns)
    images = torch.stack(crops)
    mean = images.mean((0, 2, 3), keepdim=True)
    std = images.std((0, 2, 3), keepdim=True)
    images = (images - mean) / std
    return images.to(dtype).contiguous(), torch.tensor(labels, dtype=torch.int64)
