"""A small CNN that tells the classes of a 28-px data set apart: what `mirage score` measures samples with
(class accuracy, Fréchet distance in its feature space, whether each view of an illusion shows its prompt).
Trained `--noisy`, it is a guide instead: it reads images noised as a diffusion model sees them (classifier
guidance, engine/guide.py). A file holds the weights and the test set's feature statistics (so scoring needs
no data set), with the config, test accuracy and reference Fréchet distance in its metadata; the shipped
ones, one of each per built-in data set, are in mirage/builtin/.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mirage.backends.small import BUILTIN, builtin_path
from mirage.errors import MirageError, UsageError
from mirage.io import atomic_write

FORMAT = "mirage-classifier/1"


@dataclass
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64, 128)  # one conv stage per entry, halving the size between stages
    features: int = 128  # width of the layer Fréchet distances are measured in
    classes: int = 10
    size: int = 28
    data: str = ""
    class_names: list[str] = field(default_factory=list)
    noisy: bool = False  # a guide: takes x_t and its noise level sqrt(1 - alpha_bar) (0 = a clean image)


class Classifier(nn.Module):
    """conv-BN-ReLU stages with max pooling between them, pooled to a 3x3 grid (where things are matters:
    a shirt's sleeves, a 7's bar), then a fully connected layer of `features` units and the class layer.
    `features(x)`, that layer's output, is what Fréchet distances are measured in. A noisy one (a guide) sees
    the noise level as a second input channel, constant over the image."""

    GRID = 3

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = 2 if config.noisy else 1
        for k, out in enumerate(config.channels):
            if k:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        layers += [nn.AdaptiveAvgPool2d(self.GRID), nn.Flatten(),
                   nn.Linear(width * self.GRID ** 2, config.features), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(config.features, config.classes))
        # feature mean and covariance of the test set, filled in after training: scoring needs no data set
        self.register_buffer("test_mu", torch.zeros(config.features))
        self.register_buffer("test_sigma", torch.zeros(config.features, config.features))
        self.info: dict = {}  # test accuracy, reference FD, how it was trained

    def features(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """[N, 1, H, W] in [-1, 1] (with a guide: noised, at noise levels `noise` [N], default 0) ->
        [N, features]."""
        if self.config.noisy:
            level = torch.zeros(len(x), device=x.device) if noise is None else noise
            x = torch.cat([x, level.to(x).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])], 1)
        return self.trunk(x)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.head(self.features(x, noise))


# ---- files --------------------------------------------------------------------------------------
def save(model: Classifier, path: Path) -> None:
    """Weights and test-set statistics (fp32) in one safetensors file, config and info in its metadata;
    written to a temporary file and renamed so a killed run leaves no half file."""
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.config)), "info": json.dumps(model.info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load(path: str | Path) -> Classifier:
    """The classifier (in eval mode, with its info) in a file `save` wrote."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no classifier at {path}: give a built-in name (fashion, digits) or a .safetensors file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise MirageError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise MirageError(f"{path} is not a mirage classifier (format {meta.get('format')!r}); "
                          f"make one with `mirage train classifier`")
    config = ClassifierConfig(**json.loads(meta["config"]))
    config.channels = tuple(config.channels)
    model = Classifier(config)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shapes that do not fit the config
        raise MirageError(f"{path} does not match its own config: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise MirageError(f"{path} does not match its own config (missing {missing}, unexpected {unexpected})")
    model.info = json.loads(meta.get("info", "{}"))
    return model.eval()


# ---- the shipped classifiers and guides ---------------------------------------------------------
def builtin_data(model) -> str | None:
    """The built-in data set (fashion, digits) of a class-conditioned small model, or None (IF, an
    unconditional model, another data set)."""
    data = getattr(model, "data", None)
    data = "digits" if data == "mnist" else data
    return data if data in BUILTIN and getattr(model, "class_names", None) else None


def classifier_for(model) -> nn.Module | None:
    """The shipped classifier of a class-conditioned built-in model's data set, or None: what ranks and
    checks candidates."""
    return _shipped(model, "classifier")


def guide_for(model) -> nn.Module | None:
    """The shipped guide (a classifier of noised images) of the model's data set, or None: what steers
    `--classifier-guidance`."""
    return _shipped(model, "guide")


def _shipped(model, kind: str) -> nn.Module | None:
    data = builtin_data(model)
    path = builtin_path(data, kind) if data else None
    return load_classifier(path) if path is not None and path.is_file() else None


def load_classifier(name_or_path: str | Path) -> nn.Module:
    """A shipped classifier by data-set name (fashion, digits or mnist) or one `mirage train classifier` wrote."""
    name = str(name_or_path)
    name = "digits" if name == "mnist" else name
    return load(builtin_path(name, "classifier") if name in BUILTIN else Path(name))


def reference_fd(name_or_classifier: str | Path | nn.Module) -> float:
    """The Fréchet distance between 1000 real training images and the test set, measured when the classifier
    was trained: what a sample run of 1000 images is compared with (the target is <= 2x this)."""
    classifier = name_or_classifier
    if not isinstance(classifier, nn.Module):
        classifier = load_classifier(classifier)
    return classifier.info["reference_fd"]


def test_stats(classifier: nn.Module) -> tuple[Tensor, Tensor]:
    """The test set's feature mean and covariance stored with the classifier."""
    return classifier.test_mu, classifier.test_sigma


