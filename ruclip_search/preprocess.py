"""PIL image -> normalised (3, S, S) float32 tensor, as RuCLIP's processor feeds its image encoder.

Two modes:

* ``exact`` reproduces ``RuCLIPProcessor.image_transform`` bit for bit: centre crop of the largest square
  (torchvision ``RandomResizedCrop(S, scale=(1, 1), ratio=(1, 1))``), PIL bilinear resize, ToTensor,
  Normalize. The one difference: for images whose sides differ by exactly one pixel the reference picks
  offset 0 or 1 at random along the long side; we always take 0 (its central-crop fallback).
* ``fast`` (default) decodes JPEGs at a reduced DCT scale (PIL draft, short side kept >= 1.5 x S), crops and
  resizes in one PIL call on the reduced image, applies EXIF orientation to the small result, and
  normalises in one vectorised step. On the Debian wallpapers it measures >= 42.9 dB PSNR (median 52 dB)
  against ``exact`` over 0..1 pixel values; the floor asked for is 35 dB, median 45 dB. Draft scale
  2 x S gained ~4 dB at the minimum but cost ~40% more time on baseline JPEGs (larger decode and resize);
  1 x S fell to 35.8 dB. See scripts/bench_preprocess.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, Source, decode, transpose

#: In fast mode JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) keeping both sides
#: >= DRAFT_FACTOR x image_size, so the centre crop is downscaled >= 1.5x by the antialiasing resize.
DRAFT_FACTOR = 1.5

_MODES = ("exact", "fast")
_SWAPS_AXES = {5, 6, 7, 8}


def centre_crop(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square the reference crops: torchvision's central fallback."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class Preprocessor:
    """Image -> model input tensor. Picklable, so indexer worker processes get a copy."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    mode: str = "fast"  # "exact" | "fast"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {self.mode!r}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, not {self.image_size}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Crop, resize and normalise an image that is already open (any mode: converted as PIL does)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.mode == "exact":
            return self._exact(image)
        return self._to_tensor(self._crop_resize(image, centre_crop(*image.size)))

    def load(self, source: Source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Open ``source`` robustly (see decode.open_image) and return its tensor. Raises ImageError."""
        return self.load_with_info(source, max_pixels=max_pixels)[0]

    def load_with_info(
        self, source: Source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, dict]:
        """As :meth:`load`, plus the header metadata of decode.image_info, from a single open."""
        if self.mode == "exact":
            decoded = decode(source, max_pixels=max_pixels)
            return self._exact(decoded.image), decoded.info
        decoded = decode(source, max_pixels=max_pixels, draft_size=round(DRAFT_FACTOR * self.image_size), orient=False)
        orientation = decoded.info["orientation"]
        width, height = decoded.info["width"], decoded.info["height"]  # as oriented, full size
        box = _unorient_box(centre_crop(width, height), orientation, *decoded.full_size)
        if decoded.scale > 1:
            box = tuple(edge / decoded.scale for edge in box)
        small = self._crop_resize(decoded.image, box)
        return self._to_tensor(transpose(small, orientation)), decoded.info

    def _crop_resize(self, image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
        """Resize ``box`` of ``image`` to S x S: in one step when shrinking at least 2x (the filter then
        barely reaches outside the box), else crop first as the reference does, for exact edges."""
        size = (self.image_size, self.image_size)
        if box[2] - box[0] < 2 * self.image_size and all(isinstance(edge, int) for edge in box):
            image = image.crop(box)
            return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)
        return image.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)

    def _exact(self, image: Image.Image) -> torch.Tensor:
        """The reference transform, step by step, with the same float operations."""
        image = image.crop(centre_crop(*image.size))
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        tensor = pixels.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return tensor.sub_(mean).div_(std)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        """uint8 HWC -> normalised float32 CHW in one multiply and one subtract."""
        std = np.asarray(self.std, dtype=np.float64)[:, None, None]
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        shift = (np.asarray(self.mean, dtype=np.float64)[:, None, None] / std).astype(np.float32)
        out = np.empty((3, image.height, image.width), dtype=np.float32)
        np.multiply(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), scale, out=out)
        out -= shift
        return torch.from_numpy(out)


def _unorient_box(
    box: tuple[int, int, int, int], orientation: int, width: int, height: int
) -> tuple[int, int, int, int]:
    """Map a box on the EXIF-oriented image to the stored (unoriented) image of size width x height."""
    left, top, right, bottom = box
    if orientation in (2, 3):  # mirrored / rotated 180: x flips
        left, right = width - right, width - left
    if orientation in (3, 4):  # rotated 180 / flipped vertically: y flips
        top, bottom = height - bottom, height - top
    if orientation in _SWAPS_AXES:
        # Oriented (x, y) is stored (y, x), (y, H - x), (W - y, H - x) or (W - y, x) for 5, 6, 7, 8.
        left, top, right, bottom = top, left, bottom, right
        if orientation in (6, 7):
            top, bottom = height - bottom, height - top
        if orientation in (7, 8):
            left, right = width - right, width - left
    return left, top, right, bottom
