"""Prompt encoding for IF: equal to IFPipeline.encode_prompt, cached on disk, T5 loaded only on a miss."""
from __future__ import annotations

import gc
import types
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mirage.backends import hub, prompts
from mirage.app.commands import embed_cmd as embed_command
from mirage.backends.prompts import MAX_LENGTH, PromptEncoder


@pytest.fixture
def t5_loads(monkeypatch):
    """Counts T5 loads and keeps weak references to every T5 model built."""
    loaded = []
    real = hub.load_text_encoder

    def counting(folder, device, dtype, plan=None):
        tokenizer, model = real(folder, device, dtype, plan)
        loaded.append(weakref.ref(model))
        return tokenizer, model

    monkeypatch.setattr(hub, "load_text_encoder", counting)
    return loaded


def test_embeddings_equal_ifpipeline_encode_prompt(tiny_if_models):
    from diffusers import IFPipeline

    pipe = IFPipeline.from_pretrained(tiny_if_models.stage_1, unet=None, safety_checker=None, watermarker=None,
                                      feature_extractor=None, dtype=torch.float32)
    prompt = "  An Oil Painting of a SNOWY mountain village "
    expected, expected_null = pipe.encode_prompt(prompt, do_classifier_free_guidance=True, clean_caption=False)
    got = PromptEncoder(str(tiny_if_models.stage_1)).encode([prompt, ""])
    assert got.shape == (2, MAX_LENGTH, pipe.text_encoder.config.d_model)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected_null[0])
    assert not torch.equal(got[0], got[1])


def test_a_cached_prompt_never_loads_t5(tiny_if_models, t5_loads):
    ref = str(tiny_if_models.stage_1)
    first = PromptEncoder(ref).encode(["a photo of a cat", ""])
    assert len(t5_loads) == 1
    again = PromptEncoder(ref).encode(["", "a photo of a cat", ""])  # a new encoder: only the disk cache helps
    assert len(t5_loads) == 1
    assert torch.equal(again[1], first[0]) and torch.equal(again[0], first[1]) and torch.equal(again[2], first[1])
    PromptEncoder(ref).encode(["a photo of a cat", "a photo of a dog"])  # one miss: T5 once, for it alone
    assert len(t5_loads) == 2


def test_t5_is_freed_after_encoding(tiny_if_models, t5_loads):
    PromptEncoder(str(tiny_if_models.stage_1)).encode(["people at a campfire"])
    gc.collect()
    assert len(t5_loads) == 1 and t5_loads[0]() is None


def test_cache_is_keyed_by_exact_prompt_and_encoder(tiny_if_models, tmp_path, t5_loads):
    enc = PromptEncoder(str(tiny_if_models.stage_1), cache_dir=tmp_path)
    a, b = enc.encode(["a dog", "A dog"])  # the same text for T5 after lower-casing, but two cache entries
    assert torch.equal(a, b) and len(list(tmp_path.glob("*.safetensors"))) == 2
    PromptEncoder(str(tiny_if_models.stage_1), dtype=torch.float64, cache_dir=tmp_path).encode(["a dog"])
    assert len(t5_loads) == 2  # another precision is another encoder
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_entries_name_their_encoder_and_prompt(tiny_if_models, tmp_path):
    PromptEncoder(str(tiny_if_models.stage_1), cache_dir=tmp_path).encode(["a rocket ship"])
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("embeds").shape[0] == MAX_LENGTH
    assert meta["prompt"] == "a rocket ship" and meta["dtype"] == "float32"
    assert meta["encoder"].startswith(str(tiny_if_models.stage_1.resolve()))


def test_a_damaged_cache_entry_is_encoded_again(tiny_if_models, tmp_path, t5_loads):
    enc = PromptEncoder(str(tiny_if_models.stage_1), cache_dir=tmp_path)
    good = enc.encode(["a skull"])
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    assert torch.equal(enc.encode(["a skull"]), good)
    assert len(t5_loads) == 2 and enc.is_cached("a skull")


def test_cache_dir_follows_mirage_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRAGE_CACHE", str(tmp_path))
    assert prompts.default_cache_dir() == tmp_path / "embeds"
    monkeypatch.delenv("MIRAGE_CACHE")
    assert prompts.default_cache_dir() == Path("~/.cache/mirage/embeds").expanduser()


def test_long_prompts_are_truncated_with_a_warning(tiny_if_models):
    long = " ".join(["a cat"] * 60)
    with pytest.warns(UserWarning, match="longer than 77 tokens"):
        out = PromptEncoder(str(tiny_if_models.stage_1)).encode([long])
    assert out.shape[1] == MAX_LENGTH


def test_embed_command_precomputes(tiny_if_models, capsys, t5_loads):
    args = types.SimpleNamespace(prompts=["a hat", "a pencil", "a hat"], model=str(tiny_if_models.stage_1),
                                 device="cpu")
    assert embed_command(args) == 0
    assert capsys.readouterr().out.startswith("2 prompt(s) encoded, 0 already cached")
    assert embed_command(args) == 0
    assert capsys.readouterr().out.startswith("0 prompt(s) encoded, 2 already cached")
    assert len(t5_loads) == 1


def test_embed_command_takes_stable_diffusion_and_refuses_a_built_in_model(tmp_path, capsys):
    import tiny_sd

    from mirage.errors import UsageError

    folders = tiny_sd.build(tmp_path / "sd")
    args = types.SimpleNamespace(prompts=["a hat"], model=str(folders.sd), device="cpu")
    assert embed_command(args) == 0
    assert capsys.readouterr().out.startswith("1 prompt(s) encoded, 0 already cached")
    assert embed_command(args) == 0
    assert capsys.readouterr().out.startswith("0 prompt(s) encoded, 1 already cached")
    with pytest.raises(UsageError, match="encodes no prompts"):
        embed_command(types.SimpleNamespace(prompts=["a hat"], model="fashion", device="cpu"))
