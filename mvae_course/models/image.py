"""The image encoder q(z | x) and decoder p(x | z): the classic convolutional VAE pair.

Taught in notebooks/02_image_vae.ipynb

Three stride-2 convolutions halve the image three times (64 -> 32 -> 16 -> 8, or 32 -> 16 -> 8 -> 4),
then a linear layer gives the posterior's mu and logvar. The decoder mirrors it with transposed
convolutions and returns logits; `objectives.image_log_likelihood` turns them into log p(x | z) and
`objectives.image_mean` into pixels.

Both run their convolutions on channels-last feature maps (`B x H x W x C` in memory, the layout oneDNN
computes in, so no layer reorders its input), and both hand back fp32 even under bf16 autocast: what
leaves a network is summed over pixels or latent dimensions next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvae_course.config import ModelConfig
from mvae_course.device import full_precision


def conv_output_size(size: int, kernel: int = 4, stride: int = 2, padding: int = 1) -> int:
    """Side length after a convolution: floor((size + 2 padding - kernel) / stride) + 1.

    Taught in notebooks/02_image_vae.ipynb

    With the defaults (kernel 4, stride 2, padding 1) an even side is exactly halved.
    """
    return (size + 2 * padding - kernel) // stride + 1


def _feature_size(config: ModelConfig) -> int:
    """Side length of the last feature map; the image size must survive the halvings exactly."""
    size = config.image_size
    for _ in config.image_channels:
        size = conv_output_size(size)
    if size < 1 or size * 2 ** len(config.image_channels) != config.image_size:
        raise ValueError(
            f"ModelConfig.image_size={config.image_size} cannot be halved {len(config.image_channels)} times "
            f"(one per entry of image_channels={config.image_channels}); use a multiple of "
            f"{2 ** len(config.image_channels)}, e.g. 32 or 64"
        )
    return size


class ImageEncoder(nn.Module):
    """q(z | x) = N(mu(x), diag(exp(logvar(x)))) from a stack of stride-2 convolutions.

    Taught in notebooks/02_image_vae.ipynb
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.side = _feature_size(config)
        layers: list[nn.Module] = []
        in_channels = 3
        for channels in config.image_channels:
            layers += [nn.Conv2d(in_channels, channels, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            in_channels = channels
        self.conv = nn.Sequential(*layers)
        self.to_params = nn.Linear(in_channels * self.side**2, 2 * config.z_dim)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """image: B x 3 x H x W in [0, 1]. Returns mu, logvar: B x z_dim each."""
        image = image.contiguous(memory_format=torch.channels_last)
        h = self.conv(image)  # B x C_last x H/8 x W/8 (128 x 8 x 8 for 64 x 64 inputs)
        mu, logvar = full_precision(self.to_params(h.flatten(1))).chunk(2, dim=-1)  # B x z_dim each
        return mu, logvar


# The sub-pixel form of a 4 x 4, stride-2, padding-1 transposed convolution. Output pixel (2i + a, 2j + b)
# reads input rows i - 1, i, i + 1 (a 3 x 3 window, offset dh = 0, 1, 2) through kernel row kh = 3 - 2 dh + a
# where 0 <= kh < 4: each output parity (a, b) is an ordinary 3 x 3 convolution with 2 x 2 of the taps.
# SUBPIXEL_TAPS[a, dh] is that kh, or 4 for a tap the parity does not use (a zero row padded onto the kernel).
SUBPIXEL_TAPS = torch.tensor([[3, 1, 4], [4, 2, 0]])


def subpixel_kernel(weight: Tensor) -> Tensor:
    """The 3 x 3 convolution kernel equal to a 4 x 4, stride-2, padding-1 transposed convolution's.

    Taught in notebooks/02_image_vae.ipynb

    weight: C_in x C_out x 4 x 4 (`nn.ConvTranspose2d`'s layout). Returns 4 C_out x C_in x 3 x 3, output
    channel 4 o + 2 a + b giving output channel o at the pixels of parity (a, b), the order
    `F.pixel_shuffle(., 2)` puts them back in (Shi et al., 2016, "Is the deconvolution layer the same as a
    convolutional layer?").
    """
    c_in, c_out = weight.shape[:2]
    taps = SUBPIXEL_TAPS.to(weight.device)
    padded = F.pad(weight, (0, 1, 0, 1))  # C_in x C_out x 5 x 5: row and column 4 are the zero tap
    k = padded[:, :, taps][:, :, :, :, taps]  # C_in x C_out x a x dh x b x dw
    return k.permute(1, 2, 4, 0, 3, 5).reshape(4 * c_out, c_in, 3, 3)


class SubPixelConvTranspose2d(nn.ConvTranspose2d):
    """`nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)`, computed as a 3 x 3 convolution to 4 c_out
    channels and `pixel_shuffle(2)`.

    The same parameters, initialisation and function (equal to 2e-15 in float64); only the arithmetic's order
    differs. Faster where c_out is small: the decoder's last layer (16 -> 3 channels at 32 px, 192 images,
    forward and backward in bf16 on a CPU) takes 5.6 ms this way against 8.6 ms as a transposed convolution
    (benchmarks/README.md). With more output channels the transposed convolution is as fast or faster.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """x: N x C_in x H x W. Returns N x C_out x 2H x 2W (no `output_size`: the side always doubles)."""
        bias = self.bias.repeat_interleave(4) if self.bias is not None else None
        return F.pixel_shuffle(F.conv2d(x, subpixel_kernel(self.weight), bias, padding=1), 2)


class ImageDecoder(nn.Module):
    """p(x | z): a linear layer to a small feature map, then transposed convolutions up to the image.

    Taught in notebooks/02_image_vae.ipynb
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.side = _feature_size(config)
        channels = list(reversed(config.image_channels))  # e.g. 128, 64, 32
        self.channels = channels[0]
        self.from_z = nn.Linear(config.z_dim, channels[0] * self.side**2)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
        # The last layer has no activation: it gives logits, which the likelihood interprets. It is the same
        # transposed convolution as the others, computed in its sub-pixel form (faster with 3 channels out).
        layers.append(SubPixelConvTranspose2d(channels[-1], 3))
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """z: ... x z_dim (e.g. B, or K x B). Returns logits ... x 3 x H x W."""
        lead = z.shape[:-1]
        h = torch.relu(self.from_z(z.reshape(-1, z.shape[-1])))  # N x (C_last * side^2)
        h = h.view(-1, self.channels, self.side, self.side)  # N x C_last x H/8 x W/8
        logits = self.deconv(h.contiguous(memory_format=torch.channels_last))  # N x 3 x H x W
        return full_precision(logits).contiguous().view(*lead, *logits.shape[1:])
