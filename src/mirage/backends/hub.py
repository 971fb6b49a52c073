"""Where model weights come from: a hub repo id or a local folder in the hub's (diffusers') layout.

`resolve` turns either into a local folder holding the parts a caller needs (downloading only those, and
only the safetensors of the precision it will compute in); the `load_*` functions build the models from it
with diffusers/transformers' own `from_pretrained`. Every failure becomes one MirageError line that says
what to do. Pickled weights are never loaded.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Sequence

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from mirage.backends import memory
from mirage.errors import MirageError

PUBLISHED = ("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-I-L-v1.0", "DeepFloyd/IF-I-M-v1.0",
             "DeepFloyd/IF-II-L-v1.0", "DeepFloyd/IF-II-M-v1.0")
# Short names: "IF-I-XL", "if-ii-l-v1.0", ... -> the repo id.
ALIASES = {name.lower(): repo for repo in PUBLISHED
           for name in (repo.split("/")[1], repo.split("/")[1].removesuffix("-v1.0"))}

UNET, SCHEDULER, NOISING = "unet", "scheduler", "image_noising_scheduler"
TEXT_ENCODER, TOKENIZER = "text_encoder", "tokenizer"
TEXT_PARTS = (TEXT_ENCODER, TOKENIZER)
VAE, LOW_RES = "vae", "low_res_scheduler"  # Stable Diffusion's autoencoder; the x4 upscaler's noising
CONFIG_FILE = {UNET: "config.json", TEXT_ENCODER: "config.json", SCHEDULER: "scheduler_config.json",
               NOISING: "scheduler_config.json", TOKENIZER: "tokenizer_config.json", VAE: "config.json",
               LOW_RES: "scheduler_config.json"}
WEIGHTS_STEM = {UNET: "diffusion_pytorch_model", TEXT_ENCODER: "model", VAE: "diffusion_pytorch_model"}
# CLIP's BPE tokenizer may come as vocab.json + merges.txt alone (Stable Diffusion's published repos)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
HALF = (torch.float16, torch.bfloat16)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on a GPU (the published fp16 variants), fp32 on a CPU, where half precision is slow."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# ---- references -----------------------------------------------------------------------------------
def hub_id(ref: str) -> str | None:
    """The repo id `ref` names, or None when it is a local folder."""
    if Path(ref).expanduser().is_dir():
        return None
    repo = ALIASES.get(ref.lower(), ref)
    if not _HUB_ID.match(repo):
        raise MirageError(f"model {ref!r} is neither a folder nor a hub id like {PUBLISHED[0]}")
    return repo


def identity(ref: str, parts: Sequence[str]) -> str:
    """A name for the weights of `parts` that changes when they do, found without loading or downloading.

    A hub id names itself; a folder is named by its real path and the names, sizes and modification times
    of the files of those parts.
    """
    repo = hub_id(ref)
    if repo is not None:
        return repo
    folder = Path(ref).expanduser().resolve()
    files = sorted(f for part in parts if (folder / part).is_dir() for f in (folder / part).iterdir())
    stamp = hashlib.sha256(repr([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode())
    return f"{folder}#{stamp.hexdigest()[:16]}"


def resolve(ref: str, parts: Sequence[str], dtype: torch.dtype = torch.float32) -> Path:
    """A local folder holding `parts` of model `ref`; a hub id's files are downloaded once (or found cached)."""
    repo = hub_id(ref)
    folder = Path(ref).expanduser() if repo is None else _download(repo, tuple(parts), dtype in HALF)
    for part in parts:
        check_complete(_layout_problem(folder, part), folder, repo, "a model folder in the hub's layout",
                       fetch_hint=True)
    return folder


def check_complete(problem: str | None, folder: Path, repo: str | None, what: str, fetch_hint: bool = False,
                   error: type[MirageError] = MirageError) -> None:
    """One line for what a model folder lacks: a download to repeat, or a local folder that is not `what`."""
    if problem and repo is not None:
        fetch = f" or `mirage fetch {repo}`" if fetch_hint else ""
        raise MirageError(f"the downloaded copy of {repo} is incomplete ({problem}): run `hf download {repo}`"
                          f"{fetch} with network")
    if problem:
        raise error(f"{folder} is not {what}: {problem}")


def _layout_problem(folder: Path, part: str) -> str | None:
    config = folder / part / CONFIG_FILE[part]
    if not config.is_file():
        return f"{config.relative_to(folder)} is missing"
    if part == TOKENIZER and not any((folder / part / f).is_file() for f in TOKENIZER_FILES):
        return f"{part}/tokenizer.json (or spiece.model, or vocab.json and merges.txt) is missing"
    if part in WEIGHTS_STEM and not weight_files(folder / part):
        pickles = [f.name for f in (folder / part).iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            return (f"{part}/{pickles[0]} is a pickle, which mirage never loads: "
                    f"provide {part}/{WEIGHTS_STEM[part]}.safetensors")
        return f"{part}/{WEIGHTS_STEM[part]}.safetensors is missing"
    return None


# ---- downloading ----------------------------------------------------------------------------------
@functools.cache  # once per process: the hub is asked about a repo once, not by every stage object
def _download(repo: str, parts: tuple[str, ...], half: bool) -> Path:
    """Fetch the configs of `parts` and the weights in the wanted precision, the other one where it lacks."""
    folder = _snapshot(repo, parts, fp16=half)
    lacking = [p for p in parts if p in WEIGHTS_STEM and not weight_files(folder / p)]
    return _snapshot(repo, lacking, fp16=not half) if lacking else folder


def _snapshot(repo: str, parts: Sequence[str], fp16: bool) -> Path:
    allow = ["model_index.json"]
    for part in parts:
        allow += [f"{part}/*.json", f"{part}/*.model", f"{part}/*.txt"]
        if part in WEIGHTS_STEM:
            allow.append(f"{part}/*.fp16*.safetensors" if fp16 else f"{part}/*.safetensors")
    return download(repo, allow, None if fp16 else ["*.fp16*"], PUBLISHED[0], fetch_hint=True)


def download(repo: str, allow: list[str], ignore: list[str] | None, example: str, fetch_hint: bool = False) -> Path:
    """The files of `repo` that `allow` names, from the hub's cache or downloaded, or a one-line MirageError
    explaining a gated repo, an unknown id or weights that are not here and cannot be fetched."""
    offline = hub_constants.is_offline_mode()
    try:
        return Path(snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore, local_files_only=offline))
    except GatedRepoError:
        raise MirageError(f"{repo} is gated: accept the licence at https://huggingface.co/{repo} and run "
                          f"`hf auth login` or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise MirageError(f"{repo} is neither a local folder nor a model on the hub (or it is private and no "
                          f"token is set): check the id, e.g. {example}, or pass a folder") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        fetch = f" or `mirage fetch {repo}`" if fetch_hint else ""
        raise MirageError(f"the weights of {repo} are not on this machine and {why}: they must be downloaded "
                          f"once, run `hf download {repo}`{fetch} with network, or pass a local folder") from None
    except OSError as e:  # disk full, permissions, a hub error answer
        raise MirageError(f"cannot download {repo}: {_first_line(e)}") from None


# ---- loading --------------------------------------------------------------------------------------
def weight_files(part_dir: Path) -> list[Path]:
    """The safetensors weights (and shard indices) of one part, of any precision."""
    if not part_dir.is_dir():
        return []
    return sorted(f for f in part_dir.iterdir() if f.name.endswith(".safetensors") or
                  (".safetensors.index" in f.name and f.suffix == ".json"))


def variant(part_dir: Path, dtype: torch.dtype) -> str | None:
    """"fp16" to load the fp16-variant files: when computing in half precision, or when they are all there is."""
    names = [f.name for f in weight_files(part_dir)]
    fp16 = [n for n in names if ".fp16" in n]
    full = [n for n in names if ".fp16" not in n]
    return "fp16" if fp16 and (dtype in HALF or not full) else None


def read_config(folder: Path, part: str) -> dict:
    path = folder / part / CONFIG_FILE[part]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MirageError(f"cannot read {path}: {_first_line(e)}") from None


def variant_files(part_dir: Path, dtype: torch.dtype) -> list[Path]:
    """The safetensors files `from_pretrained` would read for this precision: one file, or a sharded set
    named by its index."""
    fp16 = variant(part_dir, dtype) == "fp16"
    chosen = [f for f in weight_files(part_dir) if (".fp16" in f.name) == fp16]
    index = [f for f in chosen if f.suffix == ".json"]
    if index:
        shards = json.loads(index[0].read_text())["weight_map"].values()
        return [part_dir / name for name in dict.fromkeys(shards)]
    return chosen


def load_unet(folder: Path, part: str, device: torch.device, dtype: torch.dtype, plan=None,
              channels_last: bool = False):
    """A diffusers UNet built from its config on the meta device and filled by memory.place."""
    from diffusers import UNet2DConditionModel

    with _loading(folder, part):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(read_config(folder, part))
        memory.place(unet, variant_files(folder / part, dtype), torch.device(device), dtype,
                     plan or memory.Plan("gpu"), channels_last)
    return unet.eval()


def load_text_encoder(folder: Path, device: torch.device, dtype: torch.dtype, plan=None):
    """(tokenizer, T5EncoderModel) from the text_encoder/ and tokenizer/ parts of `folder`."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    _require_protobuf_for_spiece(folder / TOKENIZER)
    with _loading(folder, TOKENIZER):
        tokenizer = AutoTokenizer.from_pretrained(folder, subfolder=TOKENIZER)
    plan = plan or memory.Plan("gpu")
    with _loading(folder, TEXT_ENCODER):
        if plan.name == "8bit":
            return tokenizer, _t5_8bit(folder, device, dtype)
        with torch.device("meta"):
            model = T5EncoderModel(T5Config.from_pretrained(folder, subfolder=TEXT_ENCODER))
        memory.place(model, variant_files(folder / TEXT_ENCODER, dtype), torch.device(device), dtype, plan)
    return tokenizer, model.eval()


def load_clip_text(folder: Path, device: torch.device, dtype: torch.dtype):
    """(CLIPTokenizer, CLIPTextModel) from Stable Diffusion's tokenizer/ and text_encoder/, loaded whole with
    transformers' own loader, as the pipeline loads them."""
    import transformers

    with _loading(folder, TOKENIZER):
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder=TOKENIZER)
    with _loading(folder, TEXT_ENCODER):
        model = transformers.CLIPTextModel.from_pretrained(
            folder, subfolder=TEXT_ENCODER, dtype=dtype, use_safetensors=True,
            variant=variant(folder / TEXT_ENCODER, dtype)).to(device).eval()
    return tokenizer, model


def _t5_8bit(folder: Path, device: torch.device, dtype: torch.dtype):
    """T5 quantized to int8 while loading, by bitsandbytes through transformers (the 8bit plan)."""
    from transformers import BitsAndBytesConfig, T5EncoderModel

    return T5EncoderModel.from_pretrained(folder, subfolder=TEXT_ENCODER, dtype=dtype, use_safetensors=True,
                                          variant=variant(folder / TEXT_ENCODER, dtype), device_map={"": device},
                                          quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()


def text_sizes(folder: Path, dtype: torch.dtype):
    """What T5 needs for memory.choose_plan: its weights, a little working memory (it runs once on 77
    tokens a prompt), and whether it can be quantized to 8 bits here."""
    return memory.Sizes(weights_bytes(folder, TEXT_ENCODER, dtype), work=memory.GiB // 2,
                        int8=importlib.util.find_spec("bitsandbytes") is not None)


def model_index(ref: str) -> dict | None:
    """A folder's model_index.json (which pipeline it is and its settings), None where there is none; a hub
    id's is fetched alone (or found cached)."""
    repo = hub_id(ref)
    folder = Path(ref).expanduser() if repo is None else _download(repo, (), False)
    path = folder / "model_index.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MirageError(f"cannot read {path}: {_first_line(e)}") from None


def weights_bytes(folder: Path, part: str, dtype: torch.dtype) -> int:
    """The bytes a part's weights take in `dtype`, read from the file headers alone."""
    with _loading(folder, part):
        return memory.weights_bytes(variant_files(folder / part, dtype), dtype)


def _require_protobuf_for_spiece(tokenizer_dir: Path) -> None:
    # The published IF repos ship only spiece.model; transformers 5 converts it with protobuf.
    if not (tokenizer_dir / "tokenizer.json").is_file() and importlib.util.find_spec("google.protobuf") is None:
        raise MirageError(f"reading {tokenizer_dir / 'spiece.model'} needs the protobuf package: "
                          f"pip install protobuf")


class _loading:
    """Turns a failed from_pretrained into one line; an out-of-memory error passes through untouched."""

    def __init__(self, folder: Path, part: str):
        self.where = Path(folder) / part

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        from safetensors import SafetensorError

        if error is None or isinstance(error, torch.OutOfMemoryError):
            return False
        if isinstance(error, (OSError, ValueError, RuntimeError, KeyError, SafetensorError)):
            raise MirageError(f"cannot load {self.where}: {_first_line(error)} (the files may be corrupt or "
                              f"incomplete: download them again)") from None
        return False


def release(device: torch.device) -> None:
    """Give freed weights' memory back: collect the cycles that keep modules alive, empty the CUDA cache."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
