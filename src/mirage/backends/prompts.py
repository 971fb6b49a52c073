"""Text -> condition: T5 embeddings for DeepFloyd IF and CLIP ones for Stable Diffusion, computed once ever and
cached on disk.

T5 v1.1 XXL (4.8 B parameters) is as large as IF's UNet, so it is loaded alone, under a memory plan
(memory.py: on the GPU, streamed through it layer by layer, in 8 bits or on the CPU), encodes every prompt
of the run that is not cached yet in one go, and is freed before any UNet loads. Each embedding is kept in
<cache>/embeds/<hash>.safetensors, keyed by the encoder's identity, its precision and the exact prompt; a
cache hit never loads T5. The null prompt is "" and goes through T5 like any other, as diffusers does.
Stable Diffusion's CLIP text encoder (123 M parameters in SD 1.x, 354 M in 2.x) is small enough to load whole
on the device, without a plan; its embeddings are cached the same way (`ClipPromptEncoder`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mirage.backends import hub, memory
from mirage.io import atomic_write

MAX_LENGTH = 77  # IF's T5 was trained on 77 tokens (IFPipeline.encode_prompt)
BATCH = 16  # prompts per T5 forward pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("MIRAGE_CACHE") or "~/.cache/mirage").expanduser() / "embeds"


def preprocess(prompt: str) -> str:
    """What IFPipeline does to a prompt without clean_caption (its fallback when bs4/ftfy are missing)."""
    return prompt.lower().strip()


class PromptEncoder:
    """T5 prompt embeddings [N, 77, D] from model `ref` (a stage-I hub id or folder: its text_encoder/),
    with T5 placed by memory plan `memory` (memory.PLANS)."""

    recipe = "t5"  # in the cache key: how the text was encoded (IFPipeline's T5 and mask)

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 cache_dir: str | Path | None = None, memory: str = "auto"):
        self.ref = ref
        self.memory = memory
        self.device = torch.device(device)
        self.dtype = dtype or hub.default_dtype(self.device)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._identity: str | None = None
        self.plan: memory.Plan | None = None  # the plan T5 last ran under

    def encode(self, prompts: list[str]) -> Tensor:
        found = {p: self._read(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, e in found.items() if e is None]
        if missing:
            for prompt, embeds in zip(missing, self._run(missing)):
                self._write(prompt, embeds)
                found[prompt] = embeds
        return torch.stack([found[p] for p in prompts]).to(self.device, self.dtype)

    def is_cached(self, prompt: str) -> bool:
        return self._read(prompt) is not None

    # ---- T5, loaded alone and freed ---------------------------------------------------------------
    def _run(self, prompts: list[str]) -> list[Tensor]:
        folder = hub.resolve(self.ref, hub.TEXT_PARTS, self.dtype)
        sizes = hub.text_sizes(folder, self.dtype)
        self.plan = memory.plan_for(self.memory, self.device, sizes)

        def lean() -> None:
            hub.release(self.device)
            self.plan = memory.fall_back(self.plan, sizes.weights, "T5")

        return memory.until_it_fits(lambda: self._run_t5_as(self.plan, folder, prompts), lean)

    def _run_t5_as(self, plan: memory.Plan, folder: Path, prompts: list[str]) -> list[Tensor]:
        memory.note_plan(f"{self.ref}: T5 ({len(prompts)} prompt(s) to encode)", plan, self.device)
        tokenizer, model = hub.load_text_encoder(folder, memory.compute_device(plan, self.device), self.dtype, plan)
        try:
            out = []
            for i in range(0, len(prompts), BATCH):
                out += list(_embed(tokenizer, model, [preprocess(p) for p in prompts[i:i + BATCH]]).cpu())
            return out
        finally:
            del tokenizer, model
            hub.release(self.device)

    # ---- the cache --------------------------------------------------------------------------------
    def _key(self, prompt: str) -> tuple[Path, dict[str, str]]:
        if self._identity is None:
            self._identity = hub.identity(self.ref, hub.TEXT_PARTS)
        meta = {"encoder": self._identity, "recipe": self.recipe, "dtype": str(self.dtype).removeprefix("torch."),
                "max_length": str(MAX_LENGTH), "prompt": prompt}
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / f"{digest[:40]}.safetensors", meta

    def _read(self, prompt: str) -> Tensor | None:
        path, meta = self._key(prompt)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if f.metadata() != meta:  # a hash collision or a foreign file: encode again
                    return None
            return load_file(path)["embeds"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is a miss, it will be rewritten
            return None

    def _write(self, prompt: str, embeds: Tensor) -> None:
        path, meta = self._key(prompt)
        tensors = {"embeds": embeds.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), replace=True)


class ClipPromptEncoder(PromptEncoder):
    """Stable Diffusion's CLIP text embeddings [N, 77, D] from the text_encoder/ and tokenizer/ of `ref`, as
    StableDiffusionPipeline.encode_prompt makes them: no lower-casing, padded to the tokenizer's length, the
    attention mask only where the config asks for it. Loaded alone, on the device, and freed."""

    recipe = "clip"

    def _run(self, prompts: list[str]) -> list[Tensor]:
        folder = hub.resolve(self.ref, hub.TEXT_PARTS, self.dtype)
        tokenizer, model = hub.load_clip_text(folder, self.device, self.dtype)
        try:
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt")
            mask = ids.attention_mask.to(self.device) if getattr(model.config, "use_attention_mask", False) \
                else None
            with torch.no_grad():
                return list(model(ids.input_ids.to(self.device), attention_mask=mask)[0].cpu())
        finally:
            del model
            hub.release(self.device)


@torch.no_grad()
def _embed(tokenizer, model, texts: list[str]) -> Tensor:
    """Tokenize and encode as IFPipeline.encode_prompt does: padded to 77, truncated, with the mask."""
    tokens = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    for text, n in zip(texts, tokenizer(texts, padding="longest", return_tensors="pt").attention_mask.sum(1)):
        if n > MAX_LENGTH:
            warnings.warn(f"prompt {text[:40]!r}... is longer than {MAX_LENGTH} tokens; the rest is ignored")
    device = model.device
    return model(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
