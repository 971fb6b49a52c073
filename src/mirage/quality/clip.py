"""CLIP as a judge of images of any back end: image-text similarity, and the two illusion metrics of the
Visual Anagrams paper (Geng et al., CVPR 2024).

For an image with maps (views) 0..N-1 and prompts 0..N-1, S[i, j] is the cosine similarity of CLIP's
embedding of map i of the image and of prompt j. A map is what a viewer sees: a view of an anagram; for a
low/high hybrid the blurred image (the low prompt, seen from afar) and the image as it is (the high prompt);
for a plain sample the image itself (S is 1x1).

- alignment A = min_i S[i, i]: the worst map's match to its own prompt.
- concealment C = the mean of the diagonal of softmax(S / tau), taken once over prompts (each map's row) and
  once over maps (each prompt's column), averaged; tau = 1 / CLIP's logit scale. C is 1 when every map matches
  its own prompt far better than any other, 1/N when the prompts cannot be told apart.

Candidates rank by A (at DECIMALS places), with C breaking ties (`rank_keys`, `rank_order`). The model is a
CLIPModel in the hub's (flat, transformers) layout, a hub id or a local folder, with its tokenizer and
CLIPImageProcessor; images of any size and 1 or 3 channels go through that processor as 8-bit RGB pictures, as
CLIP's own examples do, so an image scores the same from memory as from its PNG. It is loaded alone, fp16 on
a GPU and fp32 on a CPU, and freed with `free()` (or at the end of a `with` block); text features computed by
one judge can be handed to the next (`load(texts=...)`), so that a run encodes its prompts before any UNet
loads and later loads CLIP for images alone, where `device_for` says: on the CPU when a GPU lacks the room.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from mirage.backends import hub, memory
from mirage.errors import MirageError, UsageError
from mirage.quality.selection import best_first

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
BATCH = 64  # images per CLIP forward pass
DECIMALS = 4  # alignment is compared at this precision when ranking; closer ones are ties, broken by C
WORK = memory.GiB // 2  # GPU memory CLIP needs besides its weights: activations of BATCH images, workspaces

Map = Callable[[Tensor], Tensor]


# ---- the judge ------------------------------------------------------------------------------------
class ClipJudge:
    """A loaded CLIP: embeddings of images and prompts, and their cosine similarities."""

    def __init__(self, model, tokenizer, processor, name: str = "clip", texts: dict[str, Tensor] | None = None):
        self.model, self.tokenizer, self.processor, self.name = model, tokenizer, processor, name
        self._texts: dict[str, Tensor] = dict(texts or {})  # prompt -> its text features, computed once

    @classmethod
    def load(cls, ref: str = DEFAULT_CLIP, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             texts: dict[str, Tensor] | None = None) -> ClipJudge:
        """The CLIP `ref` names (hub id or folder) on `device`, in fp16 on a GPU and fp32 on a CPU by default;
        `texts`: prompts' text features an earlier judge of the same model computed (`text_features`)."""
        from transformers import AutoTokenizer, CLIPModel

        device = torch.device(device)
        dtype = dtype or hub.default_dtype(device)
        folder = resolve_clip(ref, half=dtype in hub.HALF)
        with hub._loading(folder, ""):
            model = CLIPModel.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                              variant=hub.variant(folder, dtype))
            tokenizer = AutoTokenizer.from_pretrained(folder)
            processor = _processor_class().from_pretrained(folder)
        return cls(model.to(device).eval(), tokenizer, processor, name=ref, texts=texts)

    # -- properties
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature's inverse, exp(logit_scale): 100 for OpenAI's models."""
        return self.model.logit_scale.detach().float().exp().item()

    @property
    def tau(self) -> float:
        return 1 / self.logit_scale

    # -- inputs
    def pixel_values(self, images: Tensor) -> Tensor:
        """[n, 3, s, s] as the model's CLIPImageProcessor makes them from images [n, C, H, W] in [-1, 1] of any
        size (C = 1 is grey, expanded to RGB), each first made an 8-bit picture (what its PNG holds)."""
        return self.processor(images=pictures(images), return_tensors="pt")["pixel_values"]

    def text_inputs(self, prompts: Sequence[str]) -> dict:
        limit = self.model.config.text_config.max_position_embeddings
        return self.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit, return_tensors="pt")

    # -- embeddings
    @torch.inference_mode()
    def image_features(self, images: Tensor, batch_size: int = BATCH) -> Tensor:
        """[n, D] unit-length float32 embeddings (on the CPU) of images [n, C, H, W] in [-1, 1]."""
        parts = []
        for part in images.split(batch_size):
            pixels = self.pixel_values(part).to(self.device, self.dtype)
            parts.append(_unit(_pooled(self.model.get_image_features(pixel_values=pixels))))
        return torch.cat(parts) if parts else torch.empty(0, self.model.config.projection_dim)

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """[m, D] unit-length float32 embeddings of the prompts; each prompt is encoded once per judge."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._texts))
        if new:
            inputs = {k: v.to(self.device) for k, v in self.text_inputs(new).items()}
            for p, f in zip(new, _unit(_pooled(self.model.get_text_features(**inputs)))):
                self._texts[p] = f
        if not prompts:
            return torch.empty(0, self.model.config.projection_dim)
        return torch.stack([self._texts[p] for p in prompts])

    def similarity(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """[n, m] cosine similarity of each image with each prompt."""
        return self.image_features(images) @ self.text_features(prompts).T

    # -- memory
    def free(self) -> None:
        """Drops the model and gives its memory back (the judge cannot be used after this)."""
        device = self.device
        self.model = self.tokenizer = self.processor = None
        self._texts = {}
        hub.release(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.model is not None:
            self.free()


def _processor_class():
    # transformers 5 names the PIL implementation; CLIPImageProcessor there needs torchvision (and resizes a
    # little differently). The PIL one gives the same pixels on every machine.
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def pictures(images: Tensor) -> list[Image.Image]:
    """Images [n, C, H, W] in [-1, 1] (C = 1 or 3) as 8-bit RGB pictures, exactly as io.to_pil (and so their
    PNGs) makes them, converted in one batch (per-image tensor ops crawl on a busy CPU)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"CLIP scores images [n, C, H, W] with 1 or 3 channels, got {tuple(images.shape)}")
    x = images.detach().float().cpu().expand(-1, 3, -1, -1)
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a) for a in array]


def _pooled(output) -> Tensor:
    # transformers 5 returns the projected embedding as an output's pooler_output; 4.x returns it as is
    return output if isinstance(output, Tensor) else output.pooler_output


def _unit(x: Tensor) -> Tensor:
    x = x.float().cpu()
    return x / x.norm(dim=-1, keepdim=True)


# ---- the illusion metrics ---------------------------------------------------------------------------
def view_similarity(judge: ClipJudge, images: Tensor, prompts: Sequence[str] | Sequence[Sequence[str]],
                    maps: Sequence[Map]) -> Tensor:
    """[n, V, V]: S[k, i, j] is the similarity of maps[i](images[k]) with prompts[k][j] (one list of V
    prompts for all images, or one per image). All maps of all images go through CLIP in batches."""
    n, views = len(images), len(maps)
    rows = [list(prompts)] * n if prompts and isinstance(prompts[0], str) else [list(p) for p in prompts]
    if len(rows) != n or any(len(r) != views for r in rows):
        raise UsageError(f"{n} images with {views} maps need {views} prompts each, in the maps' order")
    if n == 0:
        return torch.empty(0, views, views)
    seen = torch.cat([m(images.float()) for m in maps])  # [V * n, C, H, W], map-major
    image = judge.image_features(seen).reshape(views, n, -1).transpose(0, 1)  # [n, V, D]
    unique = list(dict.fromkeys(p for r in rows for p in r))
    text = judge.text_features(unique)
    index = torch.tensor([[unique.index(p) for p in r] for r in rows])
    return image @ text[index].transpose(1, 2)


def alignment(S: Tensor) -> Tensor:
    """A = min_i S[..., i, i]."""
    return S.diagonal(dim1=-2, dim2=-1).min(-1).values


def concealment(S: Tensor, tau: float) -> Tensor:
    """C: the mean diagonal of softmax(S / tau) over prompts (along each row) and over views (along each
    column), averaged."""
    logits = S.double() / tau
    over_prompts = logits.softmax(-1).diagonal(dim1=-2, dim2=-1).mean(-1)
    over_views = logits.softmax(-2).diagonal(dim1=-2, dim2=-1).mean(-1)
    return ((over_prompts + over_views) / 2).to(S.dtype)


def judge_scores(judge: ClipJudge, images: Tensor, prompts: Sequence[str] | Sequence[Sequence[str]],
                 maps: Sequence[Map]) -> tuple[Tensor, Tensor]:
    """(alignment [n], concealment [n]) of candidates images [n, C, H, W] in [-1, 1]; prompts[i] (or
    prompts[k][i]) is what maps[i] should show."""
    S = view_similarity(judge, images, prompts, maps)
    return alignment(S), concealment(S, judge.tau)


def rank_keys(alignment: Tensor, concealment: Tensor, decimals: int = DECIMALS) -> Tensor:
    """[n, 2] float64, what candidates rank by (quality.selection.best_first): alignment rounded to `decimals`
    places, then concealment, which breaks the ties of the first."""
    keys = [[round(float(a), decimals), float(c)] for a, c in zip(alignment, concealment)]
    return torch.tensor(keys, dtype=torch.float64).reshape(-1, 2)


def rank_order(alignment: Tensor, concealment: Tensor, decimals: int = DECIMALS) -> Tensor:
    """Indices best first: by alignment (compared at `decimals` places), ties broken by concealment; equal
    candidates keep their order."""
    return best_first(rank_keys(alignment, concealment, decimals))


def reads_right(S: Tensor) -> Tensor:
    """[...] whether every map matches its own prompt best among the prompts, and every prompt its own map
    best among the maps (a 1x1 S always does)."""
    eye = torch.arange(S.shape[-1])
    return ((S.argmax(-1) == eye) & (S.argmax(-2) == eye)).all(-1)


def candidate_scores(judge: ClipJudge, images: Tensor, prompts: Sequence[str] | Sequence[Sequence[str]],
                     maps: Sequence[Map], min_alignment: float = 0.0) -> tuple[Tensor, Tensor]:
    """(score [n, 2], right [n]) per candidate for ranking and rejection sampling (quality.selection): the
    score is `rank_keys` (alignment at DECIMALS places, then concealment), right is `reads_right` with an
    alignment of at least `min_alignment`."""
    S = view_similarity(judge, images, prompts, maps)
    a = alignment(S)
    return rank_keys(a, concealment(S, judge.tau)), reads_right(S) & (a >= min_alignment)


def device_for(ref: str, device: torch.device | str) -> tuple[torch.device, str | None]:
    """(where CLIP `ref` runs when a run asks for `device`, a note or None): there, except on a CUDA GPU with
    less free memory than CLIP's weights plus WORK (a UNet resident on it), where it runs on the CPU and the
    note says so."""
    device = torch.device(device)
    if device.type != "cuda":
        return device, None
    dtype = hub.default_dtype(device)
    need = hub.weights_bytes(resolve_clip(ref, half=dtype in hub.HALF), "", dtype) + WORK
    free = memory.vram_free(device)
    if free >= need:
        return device, None
    return torch.device("cpu"), (f"CLIP {ref} scores on the CPU: {device} has {free / memory.GiB:.1f} GiB free, "
                                 f"less than the {need / memory.GiB:.1f} GiB it needs there")


def record(S: Tensor, tau: float, digits: int = 6) -> dict:
    """What result.json and score.json keep of one image's scores: {similarity, alignment, concealment}."""
    return {"similarity": [[round(v, digits) for v in row] for row in S.tolist()],
            "alignment": round(alignment(S).item(), digits),
            "concealment": round(concealment(S, tau).item(), digits)}


# ---- where the weights come from --------------------------------------------------------------------
def resolve_clip(ref: str, half: bool = False) -> Path:
    """A local folder holding CLIP model `ref` (a folder, or a hub id, downloaded once or found cached),
    checked to be a CLIP model with its tokenizer, image processor and safetensors weights."""
    try:
        repo = hub.hub_id(ref)
    except MirageError:
        raise UsageError(f"CLIP model {ref!r} is neither a folder nor a hub id like {DEFAULT_CLIP}") from None
    folder = Path(ref).expanduser() if repo is None else _download(repo, half)
    what = str(folder) if repo is None else repo
    problem = not_clip(folder)
    if problem:
        raise UsageError(f"{what} is not a CLIP model: {problem}")
    hub.check_complete(_missing(folder), folder, repo, "a complete CLIP model folder", error=UsageError)
    return folder


def not_clip(folder: Path) -> str | None:
    """Why `folder` holds no CLIP model (a CLIPModel's config.json at its top), or None."""
    config = folder / "config.json"
    if not config.is_file():
        if (folder / "model_index.json").is_file():
            return "it holds a diffusers pipeline (model_index.json), not a CLIPModel's config.json"
        return "it has no config.json"
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        return f"its config.json is unreadable ({hub._first_line(e)})"
    if kind != "clip":
        return f"its config.json describes a {kind!r} model, not 'clip' (a CLIPModel with text and vision towers)"
    return None


def _missing(folder: Path) -> str | None:
    if not (folder / "preprocessor_config.json").is_file():
        return "preprocessor_config.json (its CLIPImageProcessor) is missing"
    if not ((folder / "tokenizer.json").is_file() or
            ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        return "its tokenizer (tokenizer.json, or vocab.json and merges.txt) is missing"
    if not hub.weight_files(folder):
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in hub.PICKLE_SUFFIXES)
        if pickles:
            return f"{pickles[0]} is a pickle, which mirage never loads: provide model.safetensors"
        return "model.safetensors is missing"
    return None


@functools.cache  # the hub is asked about a repo once per process
def _download(repo: str, half: bool) -> Path:
    """Configs, tokenizer and processor files and the model's safetensors (fp16 variants only for half)."""
    return hub.download(repo, ["*.json", "*.txt", "model*.safetensors"], None if half else ["*.fp16.*"],
                        DEFAULT_CLIP)
