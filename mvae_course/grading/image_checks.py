"""Checks for exercises/02_image_exercises.ipynb, which follows notebooks/02_image_vae.ipynb: the
encoder's feature map, where the Gaussian likelihood's gradient peaks, active units (Burda et al.) and
the diagnosis of an image VAE's training run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mvae_course.grading.diagnosis import DiagnosisJudge, curve, diverge, run_folder, shuffled, uniform
from mvae_course.grading.question import Case, Question, ReferenceJudge, case, no_inputs

NOTEBOOK = "02_image_exercises"


# --- q8: the encoder's last feature map ---------------------------------------------------------------


def _feature_cases(g: torch.Generator) -> list[Case]:
    cases = [case(64, (32, 64, 128), label="lesson 02's 64 x 64 image and channels (32, 64, 128)")]
    for _ in range(2):
        layers = int(torch.randint(1, 5, (), generator=g))
        side = int(torch.randint(1, 5, (), generator=g))
        channels = tuple(int(c) for c in torch.randint(2, 40, (layers,), generator=g))
        cases.append(case(side * 2**layers, channels))
    cases.append(case(48, (8, 16, 32, 64, 128), label="a 48-pixel image and five convolutions"))
    cases.append(case(20, (4, 8, 16), label="a 20-pixel image and three convolutions"))
    return cases


def _halvings(image_size: int, layers: int, rounding: str = "floor") -> int:
    side = image_size
    for _ in range(layers):
        side = (side + 2 - 4) // 2 + 1 if rounding == "floor" else math.ceil((side + 2 - 4) / 2) + 1
    return side


def _feature_reference(image_size: int, channels: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The last feature map of ImageEncoder, or None for a size the model refuses (it must halve exactly)."""
    side = _halvings(image_size, len(channels))
    if side < 1 or side * 2 ** len(channels) != image_size:
        return None
    return (channels[-1], side, side)


def _unchecked(image_size: int, channels: tuple[int, ...], layers: int | None = None) -> tuple[int, int, int]:
    side = _halvings(image_size, len(channels) if layers is None else layers)
    return (channels[-1], side, side)


ENCODER_FEATURE_SHAPE = Question(
    id="q8", notebook=NOTEBOOK, function="encoder_feature_shape", title="the image encoder's feature map", points=1,
    kind="derive", cases=_feature_cases,
    forbidden=("mvae_course.models.image.conv_output_size", "mvae_course.models.image._feature_size",
               "mvae_course.models.image.ImageEncoder"),
    judge=ReferenceJudge(
        _feature_reference,
        mistakes=[
            (("the model refuses an image size that its convolutions do not halve exactly (its decoder's "
              "transposed convolutions could not rebuild it): return None for those"),
             _unchecked),
            ("the channels of the last feature map are the last entry of `channels`, not the first",
             lambda n, c: (c[0], *_unchecked(n, c)[1:]) if _feature_reference(n, c) else None),
            ("the input has 3 channels but the last feature map has channels[-1]",
             lambda n, c: (3, *_unchecked(n, c)[1:]) if _feature_reference(n, c) else None),
            ("each convolution halves the side once: one halving per entry of `channels`",
             lambda n, c: _unchecked(n, c, len(c) - 1) if _feature_reference(n, c) else None),
            ("each convolution halves the side once: one halving per entry of `channels`",
             lambda n, c: _unchecked(n, c, len(c) + 1) if _feature_reference(n, c) else None),
            ("return the shape in PyTorch's order, (channels, height, width)",
             lambda n, c: (*_unchecked(n, c)[1:], c[-1]) if _feature_reference(n, c) else None),
        ],
        hint="lesson 02 section 1: what one convolution with kernel 4, stride 2 and padding 1 does to a side",
    ),
)


# --- q9: where the Gaussian likelihood's gradient peaks -----------------------------------------------


GAUSSIAN_GRADIENT_PEAK = Question(
    id="q9", notebook=NOTEBOOK, function="gaussian_gradient_peak", title="where the Gaussian's gradient peaks",
    points=1, kind="derive", cases=no_inputs,
    judge=ReferenceJudge(
        lambda: -math.log(2.0),
        mistakes=[
            (("the sigmoid's slope lambda (1 - lambda) peaks at logit 0, but the gradient also carries the error "
              "(1 - lambda), which shrinks as lambda rises: maximise their product"), lambda: 0.0),
            ("that is where lambda = sigmoid(logit) sits at the peak; the question asks for the logit",
             lambda: 1.0 / 3.0),
            ("that is log(lambda) at the peak; the question asks for the logit, log(lambda / (1 - lambda))",
             lambda: math.log(1.0 / 3.0)),
            ("the sign is off: for a white pixel the peak is where the decoder still paints it darker than grey",
             lambda: math.log(2.0)),
        ],
        hint="write the gradient of log N(1; sigmoid(l), s^2) with respect to l (lesson 02 section 2) as a "
             "function of lambda = sigmoid(l), then find its maximum",
        atol=1e-3,
    ),
)


# --- q10: active units, as Burda et al. count them ----------------------------------------------------


def _units(g: torch.Generator, N: int, kinds: list[str]) -> tuple[Tensor, Tensor]:
    """Posterior means and log-variances of N inputs, one column per unit kind, in a random order.

    "active": the mean moves with the input. The others carry nothing: "paying" has the same narrow q for
    every input (KL > 0.01), "offset" the same mean far from 0, "quiet" a mean that barely moves near 0.
    """
    mus, logvars = [], []
    for kind in kinds:
        sign = 1.0 if float(torch.rand((), generator=g)) < 0.5 else -1.0
        if kind == "active":
            mu = uniform(g, -1.0, 1.0) + uniform(g, 0.4, 1.5) * torch.randn(N, generator=g)
            logvar = uniform(g, -3.0, -1.0) + 0.1 * torch.randn(N, generator=g)
        elif kind == "paying":
            mu, logvar = torch.zeros(N), torch.full((N,), uniform(g, -2.5, -1.0))
        elif kind == "offset":
            mu, logvar = sign * uniform(g, 0.5, 2.0) + 0.001 * torch.randn(N, generator=g), torch.zeros(N)
        else:
            mu, logvar = 0.03 * torch.randn(N, generator=g), 0.01 * torch.randn(N, generator=g)
        mus.append(mu)
        logvars.append(logvar)
    order = torch.randperm(len(kinds), generator=g)
    return torch.stack(mus, 1)[:, order], torch.stack(logvars, 1)[:, order]


def _active_cases(g: torch.Generator) -> list[Case]:
    return [
        case(*_units(g, 300, ["active", "active", "paying", "quiet", "active", "offset", "quiet", "active"])),
        case(*_units(g, 60, ["paying", "active", "offset", "active"])),
        case(*_units(g, 100, ["paying", "offset", "quiet"]), label="a collapsed latent: no unit carries information"),
    ]


def _active_reference(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu.var(0) > 0.01


ACTIVE_UNITS = Question(
    id="q10", notebook=NOTEBOOK, function="active_units", title="active units (Burda et al.)", points=2,
    kind="implement", cases=_active_cases,
    judge=ReferenceJudge(
        _active_reference,
        mistakes=[
            (("that counts the units whose average KL exceeds 0.01; a unit can pay KL and carry nothing (the same q "
              "for every input). Burda et al. count a unit as active when its posterior MEAN varies across inputs"),
             lambda mu, lv: (0.5 * (lv.exp() + mu**2 - 1 - lv)).mean(0) > 0.01),
            (("you did not centre: the average of mu^2 is large for a unit whose mean is the same, far from 0, for "
              "every input; measure how mu varies across inputs"),
             lambda mu, lv: (mu**2).mean(0) > 0.01),
            ("you thresholded the standard deviation; Burda et al. threshold the variance (Cov_x of E_q[z_j])",
             lambda mu, lv: mu.std(0) > 0.01),
        ],
        hint="a unit is used when what the encoder says about it depends on the input",
    ),
)


# --- q11: diagnosing an image VAE's run --------------------------------------------------------------

IMAGE_FAILURES = {
    "healthy": "this run trained normally: its terms stay finite and its KL settles well above zero",
    "posterior_collapse": "look at the KL once beta has reached 1",
    "pixels_out_of_range": "a Bernoulli log-likelihood of pixels in [0, 1] is never positive: look at the sign "
                           "and the trend of rec_image",
    "exploding_loss": "look at the last rows of the loss",
}
IMAGE_REMEDIES = ("none", "use_bernoulli_likelihood", "rescale_pixels_to_0_1", "lower_learning_rate")


def _image_run(g: torch.Generator, failure: str) -> dict:
    n, warm = 40, 8  # logged rows (every 10 steps) and rows of KL warm-up
    steps = [10 * (i + 1) for i in range(n)]
    beta = [min(1.0, (s - 10) / (10 * warm)) for s in steps]
    pixels = 3 * 32 * 32
    likelihood = "gaussian" if failure == "posterior_collapse" else "bernoulli"
    if failure == "posterior_collapse":  # the Gaussian's gradient vanished: z unused once beta is 1
        rec = curve(g, n, pixels * uniform(g, 0.2, 0.5), pixels * uniform(g, 0.9, 1.1), rate=8.0, noise=0.005)
        peak = uniform(g, 5.0, 20.0)
        kl = [peak * math.sin(math.pi * min(1.0, i / (2.0 * warm))) ** 2 * (i < 2 * warm) + 0.002 * uniform(g, 0.5, 2)
              for i in range(n)]
    elif failure == "pixels_out_of_range":  # x in [-1, 1]: x l - log(1 + e^l) grows without bound as l falls
        slope = uniform(g, 40.0, 120.0)
        rec = [-pixels * 0.5 + slope * s * uniform(g, 0.97, 1.03) for s in steps]
        kl = curve(g, n, 5.0, uniform(g, 20.0, 40.0))
    else:
        rec = curve(g, n, -pixels * 0.69, -pixels * uniform(g, 0.12, 0.2), rate=5.0, noise=0.01)
        kl = curve(g, n, 2.0, uniform(g, 15.0, 35.0), rate=3.0, noise=0.03)
    loss = [-(r - b * k) for r, b, k in zip(rec, beta, kl)]
    if failure == "exploding_loss":
        exploded = diverge(g, loss)
        rec = [r if before == after else -after for r, before, after in zip(rec, loss, exploded)]
        loss = exploded
    rows = []
    for i, s in enumerate(steps):
        terms = {"loss": loss[i], "rec_image": rec[i], "kl": kl[i], "elbo_image": rec[i] - kl[i]}
        rows.append({"step": s, "epoch": s // 63, "split": "train", **terms, "lr": 2e-3, "beta": beta[i],
                     "samples_per_s": uniform(g, 400, 600)})
        if s % 100 == 0:
            rows.append({"step": s, "epoch": s // 63, "split": "val", **terms, "loss": -(rec[i] - kl[i])})
    config = {"name": "cpu", "model": {"fusion": "independent", "image_likelihood": likelihood, "image_sigma": 0.1},
              "train": {"lr": 2e-3, "kl_warmup_steps": 10 * warm, "max_steps": 10 * n}}
    return run_folder(rows, config)


def _image_run_cases(g: torch.Generator) -> list[Case]:
    truths = {"healthy": {"none"}, "posterior_collapse": {"use_bernoulli_likelihood"},
              "pixels_out_of_range": {"rescale_pixels_to_0_1"}, "exploding_loss": {"lower_learning_rate"}}
    extra = ["healthy", "posterior_collapse"][int(torch.randint(2, (), generator=g))]
    return shuffled(g, [case(_image_run(g, f), label="a run folder", truth=(f, truths[f]))
                        for f in [*truths, extra]])


DIAGNOSE_IMAGE_RUN = Question(
    id="q11", notebook=NOTEBOOK, function="diagnose_image_run", title="diagnose an image VAE's run", points=2,
    kind="diagnose", cases=_image_run_cases, judge=DiagnosisJudge(IMAGE_FAILURES, IMAGE_REMEDIES),
)


QUESTIONS = [ENCODER_FEATURE_SHAPE, GAUSSIAN_GRADIENT_PEAK, ACTIVE_UNITS, DIAGNOSE_IMAGE_RUN]
