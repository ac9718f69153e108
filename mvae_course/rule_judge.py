"""A second judge of shapes images with nothing learnt: position, colour and size read from the pixels,
shape (with size) by matching templates drawn by the data's own `data.shapes.render`.

A learnt judge can fail where its accuracy on real images does not look: the package's first CNN judge
was 100% on real images and read blurred stars as crosses. This one has no weights to overfit. Per image:

1. ink = max over channels minus `INK` (clipped at 0): the background and most pixel noise fall below it.
2. position: at levels 4-5, the quadrant(s) holding the most ink (one object, or two, one per quadrant);
   below level 4 the object is at the centre.
3. colour: the ink-weighted mean RGB of the object, scaled so its largest channel is 1 (a dimmer drawing
   of a colour has the same direction), and the nearest colour of the palette.
4. shape and size: the normalised cross-correlation between the object's brightness around its centroid
   and a template of every (shape, size), drawn at the same sub-pixel centroid, sharp and blurred; the
   best one. A correlation ignores brightness and contrast, so a dim or washed-out drawing still matches.

It reads the same attributes as the CNN judge, in the same order (two objects: top left first).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mvae_course.data.shapes import (
    COLOUR_RGB,
    FIXED,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    attributes_at_level,
    render,
)
from mvae_course.degrade import gaussian_blur

INK = 0.25  # brightness above which a pixel is part of an object; Gaussian noise of std 0.1 rarely gets there
MIN_INK = 1.0  # less ink than about one lit pixel in a region: nothing was drawn there, nothing is read
BLURS = (0.0, 0.75, 1.5)  # the templates' blur radii: a soft drawing matches a soft template best
STEPS = 4  # templates are drawn at centroids on a 1/4-pixel grid


class RuleJudge:
    """Reads shapes images (B x 3 x H x W in [0, 1]) into attribute dicts, with rules and templates only.

    `level` sets which attributes are read (`attributes_at_level`); `image_size` the side H = W.
    """

    def __init__(self, level: int, image_size: int) -> None:
        self.attributes = attributes_at_level(level)
        self.level, self.image_size = level, image_size
        self.palette = {c: torch.tensor(rgb, dtype=torch.float32) / max(rgb) for c, rgb in COLOUR_RGB.items()}
        sizes = SIZES if "size" in self.attributes else (FIXED["size"],)
        self.candidates = [(shape, size) for shape in SHAPES for size in sizes]
        # A window around an object's centroid that holds the largest one, blurred, with a pixel to spare.
        self.window = 2 * math.ceil(SIZE_FRACTION["large"] * image_size / 2 + 3 * max(BLURS) + 1)
        self.offsets = [self._centroid_offset(shape, size) for shape, size in self.candidates]
        self._templates: dict[tuple[int, int], Tensor] = {}

    # --- templates -----------------------------------------------------------------------------------

    def _draw(self, shape: str, size: str, cx: float, cy: float) -> Tensor:
        """One white object drawn on a window-sized canvas, as brightness: W x W in [0, 1]."""
        obj = {"shape": shape, "colour": "white", "center": [cx, cy], "diameter": SIZE_FRACTION[size] * self.image_size}
        pixels = torch.from_numpy(np.asarray(render([obj], self.window), dtype=np.float32))  # W x W x 3
        return pixels.amax(-1) / 255.0

    def _centroid_offset(self, shape: str, size: str) -> tuple[float, float]:
        """Where a shape's ink centroid sits relative to the centre it is drawn at (a triangle's is lower)."""
        c = self.window / 2
        ink = (self._draw(shape, size, c, c) - INK).clamp_min(0)
        ys, xs = _pixel_centres(self.window)
        return float((ink * xs).sum() / ink.sum()) - c, float((ink * ys).sum() / ink.sum()) - c

    def templates(self, fx: int, fy: int) -> Tensor:
        """Every candidate's template with its centroid at (W/2 + fx/STEPS, W/2 + fy/STEPS), at every blur,
        centred and scaled to unit norm: len(BLURS) x len(candidates) x (W W)."""
        key = (fx, fy)
        if key not in self._templates:
            c = self.window / 2
            sharp = torch.stack([self._draw(shape, size, c + fx / STEPS - ox, c + fy / STEPS - oy)
                                 for (shape, size), (ox, oy) in zip(self.candidates, self.offsets)])  # K x W x W
            blurred = torch.stack([sharp if r == 0 else gaussian_blur(sharp[:, None], r)[:, 0] for r in BLURS])
            self._templates[key] = _unit(blurred.flatten(-2))
        return self._templates[key]

    # --- reading ------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, Any]]:
        """The attributes read from each image (N x 3 x H x W, float in [0, 1] or uint8): N dicts; an
        object's attributes (position included) are None where its region holds no ink."""
        x = images.detach().cpu().float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the rule judge was built for {self.image_size} px images, got {tuple(x.shape[-2:])}")
        brightness = x.amax(1)  # N x H x W
        ink = (brightness - INK).clamp_min(0)
        regions, names = self._regions()  # R x H x W, R position names
        n = 2 if self.level == 5 else 1
        chosen = (ink[:, None] * regions).sum((-2, -1)).topk(n, dim=1).indices.sort(dim=1).values  # N x n
        mask = regions[chosen]  # N x n x H x W: each object's region, in `POSITIONS` order
        weight = ink[:, None] * mask
        total = weight.sum((-2, -1))  # N x n
        ys, xs = _pixel_centres(self.image_size)
        safe = total.clamp_min(1e-6)
        cx, cy = (weight * xs).sum((-2, -1)) / safe, (weight * ys).sum((-2, -1)) / safe  # N x n
        rgb = (x[:, None] * weight[:, :, None]).sum((-2, -1)) / safe[..., None]  # N x n x 3
        rgb = rgb / rgb.amax(-1, keepdim=True).clamp_min(1e-6)
        palette = torch.stack(list(self.palette.values()))  # P x 3
        colour = (rgb[:, :, None] - palette).square().sum(-1).argmin(-1)  # N x n
        out = []
        for i in range(x.shape[0]):
            flat: dict[str, Any] = {}
            for k, suffix in enumerate(("", "2")[:n]):
                if total[i, k] < MIN_INK:  # nothing drawn there: nothing is read
                    obj = dict.fromkeys(("shape", "size", "colour", "position"))
                else:
                    shape, size = self._match(brightness[i] * mask[i, k], float(cx[i, k]), float(cy[i, k]))
                    obj = {"shape": shape, "size": size, "colour": list(self.palette)[colour[i, k]],
                           "position": names[chosen[i, k]]}
                flat |= {f"{a}{suffix}": v for a, v in obj.items()}
            out.append({a: flat.get(a) for a in self.attributes})
        return out

    def _regions(self) -> tuple[Tensor, list[str]]:
        """Where objects can be: the four quadrants (R = 4) at levels 4-5, else the whole image (R = 1,
        position "centre"). Returns (R x H x W float masks, their R position names)."""
        s = self.image_size
        if "position" not in self.attributes:
            return torch.ones(1, s, s), [FIXED["position"]]
        masks = torch.zeros(len(POSITIONS), s, s)
        for q, position in enumerate(POSITIONS):
            v, h = position.split()
            masks[q, (slice(0, s // 2) if v == "top" else slice(s // 2, s)),
                  (slice(0, s // 2) if h == "left" else slice(s // 2, s))] = 1.0
        return masks, list(POSITIONS)

    def _match(self, brightness: Tensor, cx: float, cy: float) -> tuple[str, str]:
        """The (shape, size) whose template correlates best with one object's brightness (H x W, other
        regions masked off) in a window around its centroid (cx, cy)."""
        half, w = self.window // 2, self.window
        x0, y0 = math.floor(cx) - half, math.floor(cy) - half
        padded = torch.nn.functional.pad(brightness, (w, w, w, w))
        crop = padded[y0 + w: y0 + 2 * w, x0 + w: x0 + 2 * w]  # W x W, its centroid at (half + frac, ...)
        fx, fy = (round((c - math.floor(c)) * STEPS) for c in (cx, cy))
        scores = self.templates(fx, fy) @ _unit(crop.flatten())  # len(BLURS) x K
        return self.candidates[int(scores.amax(0).argmax())]


def _pixel_centres(side: int) -> tuple[Tensor, Tensor]:
    """y and x of every pixel's centre (pixel i spans [i, i + 1)), each side x side."""
    centres = torch.arange(side, dtype=torch.float32) + 0.5
    return centres[:, None].expand(side, side), centres[None, :].expand(side, side)


def _unit(x: Tensor) -> Tensor:
    """Rows centred and scaled to unit norm, so a dot product is a normalised cross-correlation."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
