"""Sample-quality metrics on the bundled digits: prompt accuracy, Frechet distance, diversity, time.

Protocol (fixed, so rows of a table compare):
    reference   the held-out real digits (every fifth of scikit-learn's 1,797; 360 images);
    samples     one per reference image, prompted with a caption of its label (captions cycle
                through all templates: "a handwritten 7", "the number seven", ...), seeds 0..359;
    judge       an MLP (64 hidden units, fixed seed) trained on the training digits:
                prompt accuracy = how often it reads the digit the prompt asked for;
                Frechet distance = FD between its hidden-layer features of samples and reference
                (the digits analogue of FID's Inception pool features);
    diversity   mean pairwise L2 distance between images of the same digit, averaged over
                digits, reported as a ratio to the same figure for the reference (1.0 = as
                diverse as real digits; mode collapse shows as a small ratio);
    time        wall time per image of sampling, batch 360, on the current device.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dmd2_serve.model.adapters import Conditioning, load_backbone, load_unet, read_card, unet_eps
from dmd2_serve.model.pipeline import FewStepPipeline
from dmd2_serve.model.sampling import ddim_sample

from .data import CAPTION_TEMPLATES, digit_caption, load_digits
from .fid_protocol import EvalError
from .losses import classifier_free_guidance

Sampler = Callable[[list[str], list[int]], Tensor]  # prompts, seeds -> images in [-1, 1] (B, 1, 8, 8)


@dataclass
class DigitsScores:
    prompt_accuracy: float
    frechet_distance: float
    diversity: float  # ratio to the reference's
    ms_per_image: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class DigitsJudge:
    """The fixed classifier / feature extractor of the protocol."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.neural_network import MLPClassifier

        images, labels = load_digits("train")
        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
        self.mlp.fit(images.flatten(1).numpy(), labels.numpy())

    def features(self, images: Tensor) -> np.ndarray:
        """(N, 64) hidden-layer activations for images in [-1, 1]."""
        x = images.reshape(len(images), -1).double().numpy()
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)

    def predict(self, images: Tensor) -> np.ndarray:
        return self.mlp.predict(images.reshape(len(images), -1).numpy())


@lru_cache(maxsize=1)
def judge() -> DigitsJudge:
    return DigitsJudge()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Heusel et al. 2017, Eq. 6)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings(record=True) as said:  # (no ``disp``: deprecated in SciPy 1.17, gone after)
        warnings.simplefilter("always")
        root = linalg.sqrtm(s_a @ s_b)
    singular = [w for w in said if issubclass(w.category, linalg.LinAlgWarning) and "singular" in str(w.message)]
    for w in said:
        if w not in singular:  # any other warning is said as it would have been
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if singular or not np.isfinite(root).all():  # offset both covariances, as clean-fid does for a non-finite
        # root; the judge's dead ReLU units make the product singular (scipy warned on every eval, the root finite)
        offset = np.eye(len(s_a)) * 1e-6
        root = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def within_class_spread(images: Tensor, labels: Tensor) -> float:
    """Mean pairwise L2 distance between images of the same label, averaged over labels."""
    spreads = []
    for d in labels.unique().tolist():
        x = images[labels == d].flatten(1).double()
        if len(x) < 2:
            continue
        dist = torch.cdist(x, x)
        spreads.append(dist.sum() / (len(x) * (len(x) - 1)))  # off-diagonal mean
    return float(torch.stack(spreads).mean())


def protocol_prompts() -> tuple[list[str], list[int], Tensor, Tensor]:
    """(prompts, seeds, reference images, reference labels) of the protocol."""
    reference, labels = load_digits("heldout")
    prompts = [digit_caption(int(d), i % len(CAPTION_TEMPLATES)) for i, d in enumerate(labels.tolist())]
    return prompts, list(range(len(prompts))), reference, labels


def score_digits(sample: Sampler) -> DigitsScores:
    """Run the protocol on a sampler."""
    prompts, seeds, reference, labels = protocol_prompts()
    t0 = time.perf_counter()
    with torch.no_grad():
        images = sample(prompts, seeds).float().clamp(-1, 1).cpu()
    ms = (time.perf_counter() - t0) * 1000 / len(prompts)
    j = judge()
    accuracy = float((j.predict(images) == labels.numpy()).mean())
    fd = frechet_distance(j.features(images), j.features(reference))
    diversity = within_class_spread(images, labels) / within_class_spread(reference, labels)
    return DigitsScores(accuracy, fd, diversity, ms)


def generator_sampler(folder: Path, steps: int | None = None, device: str = "cpu") -> Sampler:
    """A distilled generator folder as a sampler (its own few-step loop): the first ``steps`` steps of
    its schedule, all of them when None. ``EvalError`` for ``steps`` outside 1..(the schedule's
    length), from the model card, before the model loads."""
    schedule = read_card(folder).timesteps  # None for a teacher: FewStepPipeline.from_folder refuses it
    if steps is not None and schedule is not None and not 1 <= steps <= len(schedule):
        n = len(schedule)
        raise EvalError(f"--steps {steps} is outside 1..{n}: this generator was distilled for {n} steps"
                        f" ({', '.join(map(str, schedule))}); give --steps 1 to {n}, or leave it out for all {n}")
    pipe = FewStepPipeline.from_folder(folder, device=device)
    return lambda prompts, seeds: pipe(prompts, seeds, steps) * 2 - 1


def teacher_sampler(folder: Path, steps: int, guidance: float, device: str = "cpu",
                    timesteps: list[int] | None = None) -> Sampler:
    """A teacher sampled with deterministic DDIM, with CFG: over ``steps`` evenly spaced timesteps
    from T-1 to 0, or over ``timesteps`` when given (e.g. the paper's 999, 749, 499, 249). ``EvalError``
    for ``steps`` below 1, before the model loads."""
    if steps < 1:
        raise EvalError(f"--steps {steps}: a teacher samples with at least 1 DDIM step; give --steps 1 or more, or"
                        " leave it out for 50")
    backbone, unet = load_backbone(folder).to(device), load_unet(folder).eval().to(device)
    T = backbone.schedule.num_train_timesteps
    if timesteps is None:
        timesteps = np.linspace(T - 1, 0, steps).round().astype(int).tolist()
    elif len(timesteps) != steps:
        raise ValueError(f"{len(timesteps)} timesteps given for {steps} steps")
    schedule = backbone.schedule.with_timesteps(timesteps)

    def sample(prompts: list[str], seeds: list[int]) -> Tensor:
        cond = Conditioning.cat([backbone.unconditional(len(prompts)), backbone.encode_prompts(prompts)])

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            eps_u, eps_c = unet_eps(unet, torch.cat([x, x]), torch.cat([t, t]), cond, schedule).chunk(2)
            return classifier_free_guidance(eps_u, eps_c, guidance)

        noise = torch.stack([torch.randn(backbone.sample_shape, generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(device)
        return backbone.decode(ddim_sample(eps_fn, noise, schedule)) * 2 - 1

    return sample


def real_sampler() -> Sampler:
    """The training digits themselves, as a sanity row (label-matched, cycled)."""
    images, labels = load_digits("train")

    protocol, _, _, wanted = protocol_prompts()
    digit_of = dict(zip(protocol, wanted.tolist()))  # each caption names one digit

    def sample(prompts: list[str], seeds: list[int]) -> Tensor:
        # The seed picks which training image of the prompt's digit (the protocol's seeds are 0..359).
        digits = [digit_of[p] for p in prompts]
        picks = [int(torch.nonzero(labels == d)[s % int((labels == d).sum())]) for d, s in zip(digits, seeds)]
        return images[picks]

    return sample
