"""Memory plans: the chooser on given figures, placement straight from safetensors (resident, streamed
block by block, offloaded), stage-wise freeing, and the out-of-memory fallback (simulated)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from diffusers import UNet2DConditionModel

from mirage.backends import hub, memory
from mirage.backends.deepfloyd import load_stage
from mirage.backends.memory import GiB, Plan, Sizes, choose_plan, leaner
from mirage.backends.prompts import PromptEncoder
from mirage.engine.denoiser import Cond
from mirage.errors import MirageError, UsageError

UNET_I = Sizes(weights=int(8.6e9), work=2 * GiB)  # IF-I-XL in fp16
T5 = Sizes(weights=int(9.5e9), work=GiB // 2)  # T5 v1.1 XXL encoder in fp16
T5_BNB = Sizes(weights=int(9.5e9), work=GiB // 2, int8=True)


# ---- the chooser ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vram, ram, sizes, expected", [
    (78 * GiB, 100 * GiB, UNET_I, Plan("gpu")),  # an H100
    (15 * GiB, 12 * GiB, UNET_I, Plan("gpu")),  # a free 16 GB card: the UNet fits with its working memory
    (15 * GiB, 12 * GiB, T5, Plan("gpu")),  # ... and so does T5, loaded alone
    (7.5 * GiB, 12 * GiB, UNET_I, Plan("blocks", budget=int(5.5 * GiB))),  # an 8 GB card: stream the rest
    (7.5 * GiB, 12 * GiB, T5, Plan("blocks", budget=7 * GiB)),
    (7.5 * GiB, 12 * GiB, T5_BNB, Plan("blocks", budget=7 * GiB)),  # exact fp16 rather than int8 while RAM allows
    (7.5 * GiB, 2 * GiB, T5_BNB, Plan("8bit")),  # no RAM for the streamed layers: int8 fits on the GPU
    (2 * GiB, 12 * GiB, UNET_I, Plan("cpu")),  # too little VRAM to be worth streaming
    (0, 12 * GiB, UNET_I, Plan("cpu")),  # no GPU
])
def test_choose_plan_picks_the_fastest_that_fits(vram, ram, sizes, expected):
    assert choose_plan(int(vram), int(ram), sizes) == expected


def test_choose_plan_says_when_nothing_fits():
    with pytest.raises(MirageError, match=r"not enough memory: .* 8\.0 GiB of weights.* 2\.0 GiB of RAM"):
        choose_plan(GiB, 2 * GiB, UNET_I)
    with pytest.raises(MirageError, match="not enough memory"):
        choose_plan(int(7.5 * GiB), 2 * GiB, T5)  # no bitsandbytes: no 8bit way out


def test_leaner_plans_end_on_the_cpu():
    ladder, plan = [], Plan("gpu")
    while plan is not None:
        ladder.append(plan)
        plan = leaner(plan, 8 * GiB)
    assert ladder == [Plan("gpu"), Plan("blocks", 4 * GiB), Plan("blocks", 2 * GiB), Plan("blocks", GiB),
                      Plan("blocks", GiB // 2), Plan("cpu")]
    assert leaner(Plan("offload"), 8 * GiB) == leaner(Plan("8bit"), 8 * GiB) == Plan("blocks", 4 * GiB)


def test_vram_free_counts_the_cache_and_the_process_cap(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (60 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 10 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 4 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0, raising=False)
    assert memory.vram_free(torch.device("cuda", 0)) == 66 * GiB  # free + reserved but unused
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.2, raising=False)
    assert memory.vram_free(torch.device("cuda", 0)) == 12 * GiB  # 16 GiB cap - 4 allocated


def test_unknown_plan_is_refused(tiny_if_models):
    with pytest.raises(UsageError, match="memory plan 'fast' is not available; use one of auto, gpu"):
        load_stage(str(tiny_if_models.stage_1), memory="fast")


# ---- placing weights ------------------------------------------------------------------------------------
def _inputs(unet, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    return (torch.randn(n, channels, size, size, generator=g), torch.tensor(500),
            torch.randn(n, 77, unet.config.encoder_hid_dim, generator=g))


def _placed(folder, plan):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(hub.read_config(folder, "unet"))
    files = hub.variant_files(folder / "unet", torch.float32)
    return memory.place(unet, files, torch.device("cpu"), torch.float32, plan).eval()


def test_placed_weights_equal_from_pretrained(tiny_if_models):
    folder = tiny_if_models.stage_1
    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    placed = _placed(folder, Plan("gpu"))
    for (name, a), (_, b) in zip(reference.state_dict().items(), placed.state_dict().items()):
        assert torch.equal(a, b), name


def test_fp16_files_are_cast_on_load(tiny_if_models):
    unet = hub.load_unet(tiny_if_models.stage_1, "unet", torch.device("cpu"), torch.float16)
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    fp16 = hub.variant_files(tiny_if_models.stage_1 / "unet", torch.float16)
    assert [f.name for f in fp16] == ["diffusion_pytorch_model.fp16.safetensors"]


def test_blocks_stream_the_units_that_do_not_fit_and_compute_the_same(tiny_if_models):
    folder = tiny_if_models.stage_1
    whole = _placed(folder, Plan("gpu"))
    weights = sum(p.numel() * 4 for p in whole.parameters())
    streamed = _placed(folder, Plan("blocks", budget=weights // 2))
    hooked = [u for u in memory.units_of(streamed) if u._forward_pre_hooks]
    assert 0 < len(hooked) < len(memory.units_of(streamed))  # some units stay, some are streamed
    x, t, e = _inputs(whole)
    expected = whole(x, t, encoder_hidden_states=e).sample
    with torch.inference_mode():  # as the sampling loop calls it
        for _ in range(3):  # the first call records the order, the next ones copy a unit ahead
            assert torch.equal(streamed(x, t, encoder_hidden_states=e).sample, expected)


def test_streamed_units_point_at_ram_between_calls(tiny_if_models):
    folder = tiny_if_models.stage_1
    weights = sum(p.numel() * 4 for p in _placed(folder, Plan("gpu")).parameters())
    unet = _placed(folder, Plan("blocks", budget=weights // 2))
    unit = next(u for u in memory.units_of(unet) if u._forward_pre_hooks)
    before = [p.data_ptr() for p in unit.parameters()]
    seen = []
    unit.register_forward_pre_hook(lambda m, a: seen.append([p.data_ptr() for p in m.parameters()]))
    unet(*_inputs(unet)[:2], encoder_hidden_states=_inputs(unet)[2])
    assert seen and seen[0] != before  # in a slot while running
    assert [p.data_ptr() for p in unit.parameters()] == before  # back in RAM after


def test_wrong_or_missing_weights_are_one_line(tiny_if_models, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_if_models.stage_1 / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(source)
    for name, change, expected in [("extra", lambda d: d.update(extra=torch.zeros(1)), "hold 'extra'"),
                                   ("lack", lambda d: d.pop("conv_in.bias"), "lack 'conv_in.bias'"),
                                   ("shape", lambda d: d.update({"conv_in.bias": torch.zeros(3)}), r"is \(3,\)")]:
        folder = tmp_path / name
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text((source.parent / "config.json").read_text())
        changed = dict(tensors)
        change(changed)
        save_file(changed, folder / "unet" / "diffusion_pytorch_model.safetensors")
        with pytest.raises(MirageError, match=expected) as caught:
            hub.load_unet(folder, "unet", torch.device("cpu"), torch.float32)
        assert "\n" not in str(caught.value)


def test_t5_streamed_layer_by_layer_encodes_the_same(tiny_if_models, tmp_path):
    ref = str(tiny_if_models.stage_1)
    whole = PromptEncoder(ref, cache_dir=tmp_path / "a", memory="gpu").encode(["a dog in a hat", ""])
    streamed = PromptEncoder(ref, cache_dir=tmp_path / "b", memory="blocks").encode(["a dog in a hat", ""])
    assert torch.equal(whole, streamed)


def test_offload_keeps_the_weights_in_ram_between_stages(tiny_if_models):
    stage = load_stage(str(tiny_if_models.stage_1), memory="offload")
    cond = stage.encode(["a cat", ""])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first, _ = stage(x, 900, cond)
    unet = stage.unet()
    stage.free()
    assert stage._unet is None and unet.mirage_offload.on_device is None  # off the device, still in RAM
    again, _ = stage(x, 900, cond)
    assert stage.unet() is unet and torch.equal(first, again)


# ---- stage-wise loading and freeing ---------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["gpu", "blocks"])
def test_each_model_is_freed_before_the_next_loads(tiny_if_models, monkeypatch, plan):
    alive = []  # weak references to every model loaded so far
    events = []
    real_t5, real_unet = hub.load_text_encoder, hub.load_unet

    def note(kind, model):
        gc.collect()
        events.append((kind, sum(r() is not None for r in alive)))
        alive.append(weakref.ref(model))

    def load_t5(*a):
        tokenizer, model = real_t5(*a)
        note("t5", model)
        return tokenizer, model

    def load_unet(*a):
        model = real_unet(*a)
        note("unet", model)
        return model

    monkeypatch.setattr(hub, "load_text_encoder", load_t5)
    monkeypatch.setattr(hub, "load_unet", load_unet)
    one = load_stage(str(tiny_if_models.stage_1), memory=plan)
    two = load_stage(str(tiny_if_models.stage_2), memory=plan, text_encoder_from=str(tiny_if_models.stage_1))
    cond = one.encode(["a snowy village", ""])
    one(torch.zeros(2, 3, 16, 16), 500, cond)
    one.free()
    cond2 = two.encode(["a snowy village", ""])  # cached: T5 is not loaded again
    image, levels = two.noised_condition(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 32, 32), 250)
    two(torch.zeros(2, 3, 32, 32), 500, cond2.with_image(image, levels))
    two.free()
    gc.collect()
    assert events == [("t5", 0), ("unet", 0), ("unet", 0)]  # nothing else alive when each one loads
    assert all(r() is None for r in alive)


# ---- out of memory --------------------------------------------------------------------------------------
def _fail_once(monkeypatch, owner, name):
    real, calls = getattr(owner, name), []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, failing)
    return calls


def test_out_of_memory_in_a_call_moves_to_a_leaner_plan(tiny_if_models, monkeypatch):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = load_stage(str(tiny_if_models.stage_1), memory="gpu")
    cond = plain.encode(["an old man", ""])
    expected, _ = plain(x, 700, cond)
    stage = load_stage(str(tiny_if_models.stage_1), memory="gpu")
    calls = _fail_once(monkeypatch, UNet2DConditionModel, "forward")
    with pytest.warns(UserWarning, match=r"out of GPU memory with memory plan gpu; continuing with blocks") as w:
        eps, _ = stage(x, 700, cond)
    assert len(w) == 1 and "\n" not in str(w[0].message)
    assert len(calls) == 2 and stage.plan.name == "blocks"
    assert torch.equal(eps, expected)


def test_out_of_memory_while_loading_moves_to_a_leaner_plan(tiny_if_models, monkeypatch):
    stage = load_stage(str(tiny_if_models.stage_1), memory="gpu")
    cond = stage.encode(["an old man", ""])
    _fail_once(monkeypatch, memory, "place")
    with pytest.warns(UserWarning, match="continuing with blocks"):
        stage(torch.zeros(2, 3, 16, 16), 700, cond)
    assert stage.plan.name == "blocks"


def test_out_of_memory_in_t5_moves_to_a_leaner_plan(tiny_if_models, monkeypatch, tmp_path):
    expected = PromptEncoder(str(tiny_if_models.stage_1), cache_dir=tmp_path / "a").encode(["a skull"])
    from transformers import T5EncoderModel

    _fail_once(monkeypatch, T5EncoderModel, "forward")
    encoder = PromptEncoder(str(tiny_if_models.stage_1), cache_dir=tmp_path / "b", memory="gpu")
    with pytest.warns(UserWarning, match="T5: out of GPU memory with memory plan gpu"):
        assert torch.equal(encoder.encode(["a skull"]), expected)


def test_out_of_memory_with_nothing_leaner_is_one_line(tiny_if_models, monkeypatch):
    stage = load_stage(str(tiny_if_models.stage_1), memory="cpu")
    cond = stage.encode(["a cat"])

    def always(*a, **kw):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(UNet2DConditionModel, "forward", always)
    with pytest.raises(MirageError, match="out of memory running .* even with memory plan cpu"):
        stage(torch.zeros(1, 3, 16, 16), 10, cond)


def test_results_come_back_where_the_loop_runs(tiny_if_models):
    stage = load_stage(str(tiny_if_models.stage_1), memory="cpu")
    eps, var = stage(torch.zeros(1, 3, 16, 16), 10, Cond(embeds=torch.zeros(1, 77, 32)))
    assert eps.device == var.device == torch.device("cpu") and eps.dtype == torch.float32
