"""The IF back end: loading from folders and hub ids through the real code, every failure as one line,
stage I/II calls as the diffusers pipelines make them, and stage II's condition exactly as
IFSuperResolutionPipeline prepares it."""
from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from mirage.backends import hub
from mirage.backends.deepfloyd import IFStage, IFUpscaler, fetch, load_stage
from mirage.engine.denoiser import Cond, Denoiser
from mirage.errors import MirageError, UsageError


def _capture_unet_calls(unet) -> list[dict]:
    """Records every UNet call a pipeline makes: its inputs and its output."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(dict(x=args[0].clone(), t=int(args[1]), embeds=kwargs["encoder_hidden_states"],
                          level=kwargs.get("class_labels"), out=output[0]))

    unet.register_forward_hook(hook, with_kwargs=True)
    return calls


def _pipeline(cls, folder, **kw):
    pipe = cls.from_pretrained(folder, safety_checker=None, watermarker=None, feature_extractor=None,
                               dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- loading ----------------------------------------------------------------------------------------
def test_stages_load_from_folders(tiny_if_models):
    one = load_stage(str(tiny_if_models.stage_1))
    two = load_stage(str(tiny_if_models.stage_2), text_encoder_from=str(tiny_if_models.stage_1))
    assert type(one) is IFStage and type(two) is IFUpscaler
    assert isinstance(one, Denoiser) and isinstance(two, Denoiser)
    assert (one.size, one.channels, two.size, two.channels) == (16, 3, 32, 3)
    assert one.schedule.variance_type == "learned_range" and one.schedule.threshold == (0.95, 1.5)
    assert two.schedule.threshold == (0.95, 1.0)
    assert one.device == torch.device("cpu") and one.dtype == torch.float32
    assert one._unet is None and two._unet is None  # nothing heavy is loaded before the first call


def test_compile_reaches_both_stages_and_stays_off_by_default(tiny_if_models):
    from mirage.backends.runtime import COMPILE_MODE
    from mirage.backends.load import load_model, load_upscaler

    ref = str(tiny_if_models.stage_1)
    one = load_model(ref, torch.device("cpu"), compile=True)
    two = load_upscaler(str(tiny_if_models.stage_2), ref, torch.device("cpu"), compile=True)
    assert one.compile == two.compile == COMPILE_MODE
    assert load_model(ref, torch.device("cpu")).compile is None
    # off a GPU there are no CUDA graphs to compile under: the call runs eagerly and gives the same result
    x, cond = torch.randn(1, 3, 16, 16), one.encode(["a cat"])
    assert torch.equal(one(x, 500, cond)[0], load_model(ref, torch.device("cpu"))(x, 500, cond)[0])


def test_a_stage_passed_in_the_wrong_role_is_refused(tiny_if_models):
    with pytest.raises(MirageError, match="stage-II upscaler model; pass it as --upscaler"):
        IFStage(str(tiny_if_models.stage_2))
    with pytest.raises(MirageError, match="stage-I model; pass it as --model"):
        IFUpscaler(str(tiny_if_models.stage_1))


def test_unknown_memory_plan_is_a_usage_error(tiny_if_models):
    with pytest.raises(UsageError, match="memory plan 'warp'"):
        load_stage(str(tiny_if_models.stage_1), memory="warp")


def test_fp16_variant_is_chosen_only_for_half_precision(tiny_if_models):
    unet_1, unet_2 = tiny_if_models.stage_1 / "unet", tiny_if_models.stage_2 / "unet"
    assert hub.variant(unet_1, torch.float16) == "fp16" and hub.variant(unet_1, torch.float32) is None
    assert hub.variant(unet_2, torch.float16) is None  # no fp16 files: the full ones, cast
    half = load_stage(str(tiny_if_models.stage_1), dtype=torch.float16)
    eps, var = half(torch.randn(1, 3, 16, 16), 500, half.encode(["a cat"]))
    assert half.unet().dtype == torch.float16 and eps.dtype == var.dtype == torch.float32


# ---- stage I and II against the pipelines ---------------------------------------------------------------
def test_stage_1_call_equals_the_pipelines_unet_call(tiny_if_models):
    from diffusers import IFPipeline

    pipe = _pipeline(IFPipeline, tiny_if_models.stage_1)
    calls = _capture_unet_calls(pipe.unet)
    pipe("a photo of a cat", num_inference_steps=2, guidance_scale=4.0, output_type="pt",
         generator=torch.Generator().manual_seed(0))
    stage = load_stage(str(tiny_if_models.stage_1))
    for call in calls:
        eps, var = stage(call["x"], call["t"], Cond(embeds=call["embeds"]))
        assert eps.shape == var.shape == (2, 3, 16, 16)
        assert torch.equal(torch.cat([eps, var], dim=1), call["out"])
    # the embeddings the pipeline used are mirage's: null prompt first (its CFG order)
    assert torch.equal(stage.encode(["", "a photo of a cat"]).embeds, calls[0]["embeds"])


def test_stage_2_condition_and_call_equal_the_super_resolution_pipeline(tiny_if_models):
    from diffusers import IFSuperResolutionPipeline

    pipe = _pipeline(IFSuperResolutionPipeline, tiny_if_models.stage_2)
    calls = _capture_unet_calls(pipe.unet)
    low = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    embeds = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(2))
    seed, level = 3, 250
    pipe(image=low, prompt_embeds=embeds[2:], negative_prompt_embeds=embeds[:2], num_inference_steps=1,
         guidance_scale=4.0, noise_level=level, output_type="pt", generator=torch.Generator().manual_seed(seed))
    up = load_stage(str(tiny_if_models.stage_2), text_encoder_from=str(tiny_if_models.stage_1))
    # The pipeline draws the initial noise first, then the noise for the upscaled images, from one generator.
    g = torch.Generator().manual_seed(seed)
    torch.randn(2, 3, 32, 32, generator=g)
    image, levels = up.noised_condition(low, torch.randn(2, 3, 32, 32, generator=g), level)
    (call,) = calls
    assert image.shape == (2, 3, 32, 32) and levels.dtype == torch.long
    assert torch.equal(image.repeat(2, 1, 1, 1), call["x"][:, 3:])  # [uncond; cond] halves
    assert torch.equal(levels.repeat(2), call["level"])
    cond = Cond(embeds=call["embeds"], image=call["x"][:, 3:], level=call["level"])
    eps, var = up(call["x"][:, :3], call["t"], cond)
    assert torch.equal(torch.cat([eps, var], dim=1), call["out"])


def test_stage_2_needs_its_condition_and_a_valid_level(tiny_if_models):
    up = load_stage(str(tiny_if_models.stage_2), text_encoder_from=str(tiny_if_models.stage_1))
    with pytest.raises(ValueError, match="cond.image"):
        up(torch.zeros(1, 3, 32, 32), 10, Cond(embeds=torch.zeros(1, 77, 32)))
    for bad in (-1, 1000):
        with pytest.raises(UsageError, match="noise level must be between 0 and 999"):
            up.noised_condition(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 32, 32), bad)


def test_t5_is_gone_before_the_unet_loads_and_free_drops_it(tiny_if_models, monkeypatch):
    events, t5 = [], []
    real_t5, real_unet = hub.load_text_encoder, hub.load_unet

    def load_t5(*a):
        tokenizer, model = real_t5(*a)
        t5.append(weakref.ref(model))
        events.append("t5")
        return tokenizer, model

    def load_unet(*a):
        import gc

        gc.collect()
        events.append("unet" if t5 and t5[0]() is None else "unet while T5 is alive")
        return real_unet(*a)

    monkeypatch.setattr(hub, "load_text_encoder", load_t5)
    monkeypatch.setattr(hub, "load_unet", load_unet)
    stage = load_stage(str(tiny_if_models.stage_1))
    cond = stage.encode(["a lithograph of waterfalls", ""])
    first, _ = stage(torch.ones(2, 3, 16, 16), 990, cond)
    stage(torch.ones(2, 3, 16, 16), 960, cond)
    assert events == ["t5", "unet"]
    unet = weakref.ref(stage.unet())
    stage.free()
    assert unet() is None
    again, _ = stage(torch.ones(2, 3, 16, 16), 990, cond)
    assert events == ["t5", "unet", "unet"] and torch.equal(first, again)


# ---- hub ids, simulated ---------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tiny_if_models, tmp_path, monkeypatch):
    """snapshot_download over the tiny folders: copies only the files the patterns select, like the real one."""
    repos = {"DeepFloyd/IF-I-XL-v1.0": tiny_if_models.stage_1, "DeepFloyd/IF-II-L-v1.0": tiny_if_models.stage_2}
    asked = []

    def snapshot_download(repo, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        asked.append(dict(repo=repo, allow=allow_patterns, ignore=ignore_patterns))
        source, dest = repos[repo], tmp_path / repo
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, dest / name)
        return str(dest)

    hub._download.cache_clear()
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    yield asked
    hub._download.cache_clear()


def test_hub_ids_download_only_what_the_precision_needs(fake_hub, tmp_path):
    one = load_stage("IF-I-XL", dtype=torch.float16)  # an alias of DeepFloyd/IF-I-XL-v1.0
    unet = one.folder / "unet"
    assert (unet / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (unet / "diffusion_pytorch_model.safetensors").exists()
    one.encode(["a cat"])
    assert (one.folder / "text_encoder" / "model.fp16.safetensors").is_file()
    assert not (one.folder / "text_encoder" / "model.safetensors").exists()
    two = load_stage("DeepFloyd/IF-II-L-v1.0", dtype=torch.float16, text_encoder_from="IF-I-XL")
    assert (two.folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # no fp16 there: fp32
    assert (two.folder / "image_noising_scheduler" / "scheduler_config.json").is_file()
    assert not (two.folder / "text_encoder").exists()
    assert [a["repo"] for a in fake_hub].count("DeepFloyd/IF-II-L-v1.0") == 3  # fp16 try, fp32, noising


def test_fetch_gets_what_a_stage_needs(fake_hub):
    fetch("DeepFloyd/IF-I-XL-v1.0", torch.float32)
    folder = Path(fetch("DeepFloyd/IF-II-L-v1.0", torch.float32))
    assert (folder / "image_noising_scheduler" / "scheduler_config.json").is_file()
    stage_1 = folder.parent / "IF-I-XL-v1.0"
    assert (stage_1 / "text_encoder" / "model.safetensors").is_file()
    assert (stage_1 / "tokenizer" / "tokenizer.json").is_file()
    assert not (stage_1 / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()


def _http_error(cls):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/DeepFloyd/IF-I-XL-v1.0")
    return cls("401 Client Error", response=httpx2.Response(401, request=request))


@pytest.mark.parametrize("error, offline, expected", [
    (lambda: _http_error(GatedRepoError), False,
     "DeepFloyd/IF-I-XL-v1.0 is gated: accept the licence at https://huggingface.co/DeepFloyd/IF-I-XL-v1.0 "
     "and run `hf auth login` or set HF_TOKEN"),
    (lambda: _http_error(RepositoryNotFoundError), False,
     "DeepFloyd/IF-I-XL-v1.0 is neither a local folder nor a model on the hub"),
    (lambda: LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), False,
     "the weights of DeepFloyd/IF-I-XL-v1.0 are not on this machine and the hub cannot be reached: they must "
     "be downloaded once, run `hf download DeepFloyd/IF-I-XL-v1.0` or `mirage fetch DeepFloyd/IF-I-XL-v1.0` "
     "with network, or pass a local folder"),
    (lambda: LocalEntryNotFoundError("outgoing traffic has been disabled"), True,
     "the weights of DeepFloyd/IF-I-XL-v1.0 are not on this machine and HF_HUB_OFFLINE is set"),
    (lambda: OSError(28, "No space left on device"), False,
     "cannot download DeepFloyd/IF-I-XL-v1.0: [Errno 28] No space left on device"),
])
def test_hub_failures_are_one_line(monkeypatch, error, offline, expected):
    seen = {}

    def snapshot_download(repo, **kw):
        seen.update(kw)
        raise error()

    hub._download.cache_clear()
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub.hub_constants, "is_offline_mode", lambda: offline)
    with pytest.raises(MirageError) as caught:
        load_stage("DeepFloyd/IF-I-XL-v1.0")
    message = str(caught.value)
    assert message.startswith(expected) and "\n" not in message
    assert caught.value.__cause__ is None and seen["local_files_only"] is offline


# ---- folders that are not models ------------------------------------------------------------------------
def _broken_copy(src: Path, dst: Path, remove=(), write=None) -> str:
    shutil.copytree(src, dst)
    for name in remove:
        (dst / name).unlink()
    for name, data in (write or {}).items():
        (dst / name).write_bytes(data)
    return str(dst)


@pytest.mark.parametrize("remove, write, expected", [
    (["unet/config.json"], None, "is not a model folder in the hub's layout: unet/config.json is missing"),
    (["scheduler/scheduler_config.json"], None, "scheduler/scheduler_config.json is missing"),
    (["unet/diffusion_pytorch_model.safetensors"], None, "unet/diffusion_pytorch_model.safetensors is missing"),
    (["unet/diffusion_pytorch_model.safetensors"], {"unet/diffusion_pytorch_model.bin": b"pickle"},
     "unet/diffusion_pytorch_model.bin is a pickle, which mirage never loads"),
])
def test_a_folder_that_is_not_a_model_says_what_is_missing(tiny_if_models, tmp_path, remove, write, expected):
    folder = _broken_copy(tiny_if_models.stage_2, tmp_path / "m", remove, write)
    with pytest.raises(MirageError, match=expected.replace("(", r"\(")):
        load_stage(folder)


def test_a_stage_2_folder_needs_its_noising_scheduler(tiny_if_models, tmp_path):
    folder = _broken_copy(tiny_if_models.stage_2, tmp_path / "m", ["image_noising_scheduler/scheduler_config.json"])
    with pytest.raises(MirageError, match="image_noising_scheduler/scheduler_config.json is missing"):
        load_stage(folder)


def test_missing_or_unreadable_text_encoder(tiny_if_models, tmp_path, monkeypatch):
    stage = load_stage(str(tiny_if_models.stage_2))  # no text_encoder_from: IF-II folders carry no T5 here
    with pytest.raises(MirageError, match="text_encoder/config.json is missing"):
        stage.encode(["a cat"])
    folder = _broken_copy(tiny_if_models.stage_1, tmp_path / "spm", ["tokenizer/tokenizer.json"],
                          {"tokenizer/spiece.model": b"\x00"})
    real_find_spec = hub.importlib.util.find_spec
    monkeypatch.setattr(hub.importlib.util, "find_spec",
                        lambda name, *a: None if name == "google.protobuf" else real_find_spec(name, *a))
    with pytest.raises(MirageError, match="spiece.model needs the protobuf package: pip install protobuf"):
        load_stage(folder).encode(["a cat"])


@pytest.mark.parametrize("part, name", [("unet", "diffusion_pytorch_model.safetensors"),
                                        ("text_encoder", "model.safetensors")])
def test_corrupt_weights_are_one_line(tiny_if_models, tmp_path, part, name):
    good = (tiny_if_models.stage_1 / part / name).read_bytes()
    folder = _broken_copy(tiny_if_models.stage_1, tmp_path / "m", write={f"{part}/{name}": good[:200]})
    stage = load_stage(folder)
    with pytest.raises(MirageError) as caught:
        cond = stage.encode(["a cat"])
        stage(torch.zeros(1, 3, 16, 16), 10, cond)
    message = str(caught.value)
    assert message.startswith(f"cannot load {folder}/{part}: ") and "corrupt" in message and "\n" not in message


def test_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(MirageError, match="is neither a folder nor a hub id"):
        load_stage(str(tmp_path / "no" / "such" / "model"))
