"""Synthetic fluorescence-like images with a known answer, for accuracy tests and benchmarks.

Blobs of random size and brightness (Gaussian profiles, as a diffraction-limited spot or a small
cell looks), on an uneven background, with photon (Poisson) noise and camera read (Gaussian)
noise, stored as 8- or 16-bit. A share of the blobs come as touching pairs: two blobs whose
edges (radius sqrt(2) * sigma) meet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticImage", "make_image", "match"]


@dataclass(frozen=True)
class SyntheticImage:
    pixels: np.ndarray  # HxW uint8 or uint16
    centres: np.ndarray  # Nx2 (x, y)
    radii: np.ndarray  # N, blob radius sqrt(2) * sigma


def make_image(
    seed: int,
    *,
    size: int = 512,
    count: int = 120,
    touching_pairs: int = 10,
    bits: int = 16,
    sigma_range: tuple[float, float] = (1.8, 4.5),
) -> SyntheticImage:
    """A `size` x `size` image with exactly `count` blobs, `touching_pairs` pairs of them touching."""
    rng = np.random.default_rng(seed)
    sigmas: list[float] = []
    centres: list[tuple[float, float]] = []

    def free(x: float, y: float, radius: float, ignore: int = -1) -> bool:
        for i, ((cx, cy), s) in enumerate(zip(centres, sigmas, strict=True)):
            if i != ignore and math.hypot(cx - x, cy - y) < (radius + math.sqrt(2) * s) * 1.6:
                return False
        return True

    margin = 12
    while len(centres) < 2 * touching_pairs:
        s1, s2 = rng.uniform(*sigma_range, size=2)
        x, y = rng.uniform(margin, size - margin, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        gap = math.sqrt(2) * (s1 + s2)  # edges meet
        x2, y2 = x + gap * math.cos(angle), y + gap * math.sin(angle)
        if not (margin < x2 < size - margin and margin < y2 < size - margin):
            continue
        if free(x, y, math.sqrt(2) * s1) and free(x2, y2, math.sqrt(2) * s2):
            centres += [(x, y), (x2, y2)]
            sigmas += [s1, s2]
    attempts = 0
    while len(centres) < count:
        attempts += 1
        if attempts > 100_000:
            raise ValueError("image too small for that many blobs")
        s = rng.uniform(*sigma_range)
        x, y = rng.uniform(margin, size - margin, size=2)
        if free(x, y, math.sqrt(2) * s):
            centres.append((x, y))
            sigmas.append(s)

    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    full = 4000.0 if bits == 16 else 180.0
    background = full * (0.08 + 0.05 * xx / size + 0.04 * np.sin(yy / size * 3.0))
    signal = np.zeros((size, size), np.float32)
    for (x, y), s in zip(centres, sigmas, strict=True):
        amplitude = full * rng.uniform(0.3, 1.0)
        r = math.ceil(4 * s)
        y0, y1, x0, x1 = max(0, int(y) - r), min(size, int(y) + r + 1), max(0, int(x) - r), min(size, int(x) + r + 1)
        signal[y0:y1, x0:x1] += amplitude * np.exp(
            -((yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2) / (2 * s * s)
        )
    photons_per_level = 4.0 if bits == 16 else 1.0
    expected = (background + signal) * photons_per_level
    noisy = rng.poisson(expected).astype(np.float32) / photons_per_level
    noisy += rng.normal(0, full * 0.01, noisy.shape).astype(np.float32)
    top = 65535 if bits == 16 else 255
    pixels = np.clip(np.round(noisy), 0, top).astype(np.uint16 if bits == 16 else np.uint8)
    return SyntheticImage(pixels, np.array(centres), math.sqrt(2) * np.array(sigmas))


def match(truth: SyntheticImage, found: np.ndarray) -> tuple[float, float]:
    """Precision and recall of found centres (Mx2, x y): a match lies within max(2, radius) px of a
    true centre, each true blob matched at most once (closest pairs first)."""
    if len(found) == 0 or len(truth.centres) == 0:
        return (0.0 if len(found) else 1.0), (0.0 if len(truth.centres) else 1.0)
    distance = np.hypot(found[:, None, 0] - truth.centres[None, :, 0], found[:, None, 1] - truth.centres[None, :, 1])
    limit = np.maximum(2.0, truth.radii)[None, :]
    pairs = sorted((d, i, j) for (i, j), d in np.ndenumerate(distance) if d <= limit[0, j])
    used_found, used_truth = set(), set()
    for _, i, j in pairs:
        if i not in used_found and j not in used_truth:
            used_found.add(i)
            used_truth.add(j)
    return len(used_found) / len(found), len(used_truth) / len(truth.centres)
