"""What a decoder does to an image, applied to real ones: blur, pixel noise, intensity and contrast, shifts.

A judge of generated images is trained and checked on real images; a decoder's output is softer,
dimmer or noisier than any of them. These pure functions (images B x 3 x H x W in [0, 1] in, the same
shape out) degrade real images the way decoders do, so that a judge can be trained to read such images
(`augment`) and its accuracy reported on degraded copies (`DEGRADATIONS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def gaussian_blur(images: Tensor, radius: float | Tensor) -> Tensor:
    """Blur by a Gaussian of standard deviation `radius` pixels (as PIL's `GaussianBlur(radius)`).

    images: B x C x H x W; radius: one value, or B values (one per image). Zero padding: the shapes'
    background is black. Separable: a row pass, then a column pass. Returns B x C x H x W.
    """
    b, c, h, w = images.shape
    sigma = torch.as_tensor(radius, dtype=images.dtype, device=images.device).expand(b).clamp_min(1e-3)
    half = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)  # k
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)  # B x k
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (B C) x k
    x = images.reshape(1, b * c, h, w)  # one group per image channel, so each image gets its own kernel
    x = torch.nn.functional.conv2d(x, kernel[:, None, None, :], padding=(0, half), groups=b * c)
    x = torch.nn.functional.conv2d(x, kernel[:, None, :, None], padding=(half, 0), groups=b * c)
    return x.reshape(b, c, h, w)


def add_noise(images: Tensor, std: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian pixel noise of standard deviation `std` (one value, or B x 1 x 1 x 1), clamped to [0, 1]."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    return (images + noise * torch.as_tensor(std, dtype=images.dtype, device=images.device)).clamp(0, 1)


def scale_intensity(images: Tensor, gain: float | Tensor, contrast: float | Tensor = 1.0) -> Tensor:
    """Dimmer or brighter (`gain` multiplies every pixel), then flatter or steeper (`contrast` scales each
    image's deviation from its own mean): what an under- or over-confident decoder draws. Clamped to [0, 1]."""
    x = images * gain
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + (x - mean) * contrast).clamp(0, 1)


def shift(images: Tensor, dy: int, dx: int) -> Tensor:
    """Move the picture by (dy, dx) pixels, black coming in at the edges (not wrapped round)."""
    h, w = images.shape[-2:]
    out = torch.zeros_like(images)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = images[..., ys, xs]
    return out


def pixel_sample(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A Bernoulli draw per pixel and channel with the image as its mean: what a sample from a Bernoulli
    decoder looks like when the decoder's mean is exactly the real image."""
    return torch.bernoulli(images.clamp(0, 1).cpu(), generator=generator).to(images.device, images.dtype)


def augment(images: Tensor, generator: torch.Generator, max_blur: float = 1.5, max_noise: float = 0.1,
            max_shift: int = 2, p_pixel_sample: float = 0.1) -> Tensor:
    """A random degradation per image, for training a judge: each image independently gets a blur of radius
    U(0, max_blur) (a quarter of them none), noise of std U(0, max_noise) (half of them none), a gain in
    [0.6, 1.15] and a contrast in [0.7, 1.1]; the batch is shifted by up to `max_shift` pixels each way,
    and a fraction `p_pixel_sample` of the images is replaced by a pixel sample of itself.

    images: B x 3 x H x W in [0, 1] (on the CPU, where `generator` draws). Returns the same shape.
    """
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    radius = uniform(0, max_blur) * (torch.rand(b, generator=generator) > 0.25)
    x = gaussian_blur(images, radius)
    x = scale_intensity(x, uniform(0.6, 1.15).view(b, 1, 1, 1), uniform(0.7, 1.1).view(b, 1, 1, 1))
    std = uniform(0, max_noise) * (torch.rand(b, generator=generator) > 0.5)
    x = add_noise(x, std.view(b, 1, 1, 1), generator)
    sampled = torch.rand(b, generator=generator) < p_pixel_sample
    if sampled.any():
        x[sampled] = pixel_sample(images[sampled], generator)
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return shift(x, dy, dx)


# The degraded copies a judge's accuracy is reported on: name -> f(images, generator).
DEGRADATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "real": lambda x, g: x,
    "blur 0.5": lambda x, g: gaussian_blur(x, 0.5),
    "blur 1.0": lambda x, g: gaussian_blur(x, 1.0),
    "blur 1.5": lambda x, g: gaussian_blur(x, 1.5),
    "noise 0.05": lambda x, g: add_noise(x, 0.05, g),
    "noise 0.1": lambda x, g: add_noise(x, 0.1, g),
    "dim 0.6": lambda x, g: scale_intensity(x, 0.6),
    "blur 1.0 + noise 0.05": lambda x, g: add_noise(gaussian_blur(x, 1.0), 0.05, g),
    "pixel sample": pixel_sample,
}
