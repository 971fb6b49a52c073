"""How good are generated images, measured with a small classifier of the data set (quality.classifier):
class accuracy, Fréchet distance in its feature space, and whether each map of an image (a view of an anagram,
the blur of a hybrid) shows its prompt."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mirage.illusions.filters import lowpass

Filter = Callable[[Tensor], Tensor]


# ---- images -------------------------------------------------------------------------------------
def prepare(images: Tensor, size: int) -> Tensor:
    """Any batch of images -> float [N, 1, size, size] in [-1, 1], as the classifier takes them: uint8
    [N, H, W] data-set images, or [N, C, H, W] model outputs in [-1, 1] (colour averaged to grey)."""
    if images.dtype == torch.uint8:
        images = images.float().div(127.5).sub(1)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
    return x


def identity(x: Tensor) -> Tensor:
    return x


def hybrid_maps(size: int, sigma: float) -> list[Filter]:
    """How a low/high hybrid is checked: blurred (seen from afar) it shows the low prompt, as it is (close
    up) the high one. `sigma` is the low pass's, given at 64 px like the hybrid filters."""
    return [lowpass(size, sigma), identity]


@torch.inference_mode()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 1000) -> Tensor:
    return torch.cat([fn(part) for part in x.split(batch_size)])


def input_size(classifier: nn.Module) -> int:
    return classifier.config.size if hasattr(classifier, "config") else 28


def log_probs(classifier: nn.Module, images: Tensor) -> Tensor:
    """[N, classes] log-probabilities."""
    return _batched(classifier, prepare(images, input_size(classifier))).log_softmax(dim=1)


def predictions(classifier: nn.Module, images: Tensor) -> Tensor:
    return log_probs(classifier, images).argmax(dim=1)


# ---- Fréchet distance ---------------------------------------------------------------------------
def feature_stats(classifier: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance (float64) of the classifier's features over `images`."""
    feats = _batched(classifier.features, prepare(images, input_size(classifier))).double()
    if len(feats) < 2:
        raise ValueError("feature statistics need at least two images")
    return feats.mean(dim=0), torch.cov(feats.T)


def _sqrtm_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues (round-off) -> 0."""
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): the Fréchet distance of two Gaussians. The
    product under the root is symmetric, so eigh does what scipy's sqrtm would, in float64."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(value.item(), 0.0)


def frechet_distance(classifier: nn.Module, images: Tensor, reference: Tensor | tuple[Tensor, Tensor]) -> float:
    """Fréchet distance between `images` and `reference` (images, or their (mean, covariance) as stored
    with a shipped classifier) in the classifier's feature space."""
    ref = reference if isinstance(reference, tuple) else feature_stats(classifier, reference)
    return frechet_from_stats(*feature_stats(classifier, images), *ref)


# ---- accuracies ---------------------------------------------------------------------------------
def class_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of images the classifier puts in their class."""
    return (predictions(classifier, images) == labels.to(torch.long)).float().mean().item()


def map_predictions(classifier: nn.Module, images: Tensor, maps: Sequence[Filter]) -> Tensor:
    """[N, V]: the class the classifier sees in map i (a view, a blur) of each image."""
    return torch.stack([predictions(classifier, m(images)) for m in maps], 1)


def map_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, maps: Sequence[Filter]) -> dict:
    """Does map i of each image show class labels[:, i]? Per map the fraction right, and `all`: the
    fraction of images where every map is right."""
    labels = labels.to(torch.long).reshape(len(images), len(maps))
    return fractions(map_predictions(classifier, images, maps) == labels)


def fractions(right: Tensor) -> dict:
    return {"each": right.float().mean(0).tolist(), "all": right.all(1).float().mean().item()}


def illusion_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, views: Sequence) -> dict:
    """Anagrams: view i (views.View) of each image should show labels[:, i]."""
    return map_accuracy(classifier, images, labels, [v.view for v in views])


def hybrid_accuracy(classifier: nn.Module, images: Tensor, low_labels: Tensor, high_labels: Tensor,
                    blur: Filter) -> dict:
    """Hybrids: the blurred image (seen from afar) should show the low label, the full image the high one."""
    labels = torch.stack([torch.as_tensor(low_labels), torch.as_tensor(high_labels)], 1)
    return map_accuracy(classifier, images, labels, [blur, identity])


def rank(classifier: nn.Module, images: Tensor, labels: Tensor, views: Sequence | None = None) -> Tensor:
    """A score per image, higher is better: the mean log-probability of the right class over the views
    (labels [N] without views, [N, V] with V views). Sort candidates by it to keep the best."""
    return rank_maps(classifier, images, labels, [identity] if views is None else [v.view for v in views])


def rank_maps(classifier: nn.Module, images: Tensor, labels: Tensor, maps: Sequence[Filter]) -> Tensor:
    """`rank` for any maps of the image (views, blurs)."""
    return map_log_probs(classifier, images, labels, maps)[0].mean(1)


def map_log_probs(classifier: nn.Module, images: Tensor, labels: Tensor, maps: Sequence[Filter]):
    """([N, V] log-probability of labels[:, i] in map i, [N, V] whether it is the classifier's choice there)."""
    labels = labels.to(torch.long).reshape(len(images), len(maps))
    per_map = [log_probs(classifier, m(images)) for m in maps]
    chosen = torch.stack([lp.gather(1, labels[:, i:i + 1])[:, 0] for i, lp in enumerate(per_map)], 1)
    right = torch.stack([lp.argmax(1) for lp in per_map], 1) == labels
    return chosen, right
