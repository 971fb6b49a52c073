"""A tiny random-weight CLIP, built offline and saved in the hub's layout (as openai/clip-vit-base-patch32 is).

The folder holds config.json and model.safetensors (a CLIPModel with 2-layer, 32-wide text and vision towers),
the tokenizer (CLIP's byte-level BPE, built here from a small vocab: every byte, alone and as a word's end, and
merges that spell a few words whole) and preprocessor_config.json (a CLIPImageProcessor at 32 px: shortest
edge resized to 32, centre crop 32, CLIP's mean and std). It loads with transformers' own from_pretrained,
so tests can compare mirage with CLIPModel directly. Builds in well under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

SIZE = 32  # the image processor's (and the vision tower's) input size
WORDS = ("a", "photo", "of", "the", "an", "with", "and", "t-shirt/top", "trouser", "pullover", "dress", "coat",
         "sandal", "shirt", "sneaker", "bag", "ankle", "boot", "zero", "one", "two", "three", "four", "five", "six",
         "seven", "eight", "nine", "cat", "dog")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) writes the bytes 0..255 as."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
             *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in shown else chr(next(extra)) for b in range(256)]


def vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE layout: the 256 byte symbols, the same as a word's end (`x</w>`), then one merge at a time
    from the left for each word, then the two special tokens."""
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for word in words:
        for piece in _pieces(word):
            parts = list(piece[:-1]) + [piece[-1] + "</w>"]
            while len(parts) > 1:
                pair = (parts[0], parts[1])
                if pair not in merges:
                    merges.append(pair)
                    vocab.setdefault(parts[0] + parts[1], len(vocab))
                parts = [parts[0] + parts[1]] + parts[2:]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def _pieces(word: str) -> list[str]:
    """What CLIP's pre-tokenizer makes of a word: runs of letters, single digits, runs of other marks."""
    out, run = [], ""
    for c in word:
        if run and c.isalpha() != run[-1].isalpha():
            out.append(run)
            run = ""
        run += c
    return out + [run] if run else out


def tokenizer(words=WORDS) -> CLIPTokenizer:
    """CLIP's BPE tokenizer over a small vocabulary that spells `words` whole (Stable Diffusion's tiny text
    encoder uses it too)."""
    vocab, merges = vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def config(vocab_size: int, bos: int, eos: int) -> CLIPConfig:
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": eos}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": SIZE, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


PROCESSOR = {  # as openai/clip-vit-base-patch32's preprocessor_config.json, at 32 px
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True, "size": {"shortest_edge": SIZE}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": SIZE, "width": SIZE},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


def build(folder: Path, seed: int = 0) -> Path:
    """Writes the tiny CLIP to `folder` (created) and returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(config(len(tok), tok.bos_token_id, tok.eos_token_id)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
    return folder
