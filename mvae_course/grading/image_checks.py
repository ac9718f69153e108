"""Checks for exercises/02_image_exercises.ipynb: the shapes inside the convolutional image encoder."""

from __future__ import annotations

import math

import torch

from mvae_course.config import ModelConfig
from mvae_course.grading.question import Case, Question, ReferenceJudge
from mvae_course.models.image import ImageEncoder, conv_output_size

NOTEBOOK = "02_image_exercises"


# --- q6: one convolution's output size ----------------------------------------------------------------


def _conv_cases(g: torch.Generator) -> list[Case]:
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (), generator=g))

    cases: list[Case] = [(64, 4, 2, 1), (7, 3, 1, 0)]
    for _ in range(6):
        kernel = draw(1, 6)
        cases.append((draw(kernel + 2, 80), kernel, draw(1, 4), draw(0, 3)))
    return cases


CONV_OUTPUT_SIZE = Question(
    id="q6", notebook=NOTEBOOK, function="conv_output_size", title="a convolution's output size", points=1,
    cases=_conv_cases,
    judge=ReferenceJudge(
        conv_output_size,
        mistakes=[
            ("you forgot the + 1: a kernel that fits once (size == kernel) gives one output, not zero",
             lambda n, k, s, p: (n + 2 * p - k) // s),
            ("the padding goes on both sides of the image: add 2 * padding, not padding",
             lambda n, k, s, p: (n + p - k) // s + 1),
            ("round down (floor division //): a kernel that does not fully fit at the border is not applied",
             lambda n, k, s, p: math.ceil((n + 2 * p - k) / s) + 1),
            ("you ignored the kernel size", lambda n, k, s, p: (n + 2 * p) // s + 1),
        ],
    ),
)


# --- q7: the encoder's last feature map ---------------------------------------------------------------


def _feature_cases(g: torch.Generator) -> list[Case]:
    cases: list[Case] = [(64, (32, 64, 128))]
    for _ in range(3):
        layers = int(torch.randint(1, 5, (), generator=g))
        side = 2 ** int(torch.randint(0, 3, (), generator=g))
        channels = tuple(int(c) for c in torch.randint(2, 40, (layers,), generator=g))
        cases.append((side * 2**layers, channels))
    return cases


def _feature_reference(image_size: int, channels: tuple[int, ...]) -> tuple[int, int, int]:
    """What the package's ImageEncoder really produces, measured by running its convolutions."""
    encoder = ImageEncoder(ModelConfig(image_size=image_size, image_channels=channels, z_dim=2))
    with torch.no_grad():
        h = encoder.conv(torch.zeros(1, 3, image_size, image_size))
    return tuple(h.shape[1:])


def _halve(image_size: int, times: int) -> int:
    for _ in range(times):
        image_size //= 2
    return image_size


ENCODER_FEATURE_SHAPE = Question(
    id="q7", notebook=NOTEBOOK, function="encoder_feature_shape", title="the image encoder's feature map",
    points=1,
    cases=_feature_cases,
    judge=ReferenceJudge(
        _feature_reference,
        mistakes=[
            ("the channels of the last feature map are the last entry of `channels`, not the first",
             lambda n, c: (c[0], _halve(n, len(c)), _halve(n, len(c)))),
            ("the input has 3 channels but the last feature map has channels[-1]",
             lambda n, c: (3, _halve(n, len(c)), _halve(n, len(c)))),
            ("each convolution halves the side once: one halving per entry of `channels`",
             lambda n, c: (c[-1], _halve(n, len(c) - 1), _halve(n, len(c) - 1))),
            ("each convolution halves the side once: one halving per entry of `channels`",
             lambda n, c: (c[-1], _halve(n, len(c) + 1), _halve(n, len(c) + 1))),
            ("return the shape in PyTorch's order, (channels, height, width)",
             lambda n, c: (_halve(n, len(c)), _halve(n, len(c)), c[-1])),
        ],
    ),
)


QUESTIONS = [CONV_OUTPUT_SIZE, ENCODER_FEATURE_SHAPE]
