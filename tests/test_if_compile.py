"""Regional compilation of IF's UNets (runtime.compile_regions), on the tiny IF on a CPU: compiled and eager
calls agree to fp32 rounding in either scope (whole blocks, or fused.py's elementwise work), one compiled graph
serves other widths and batch sizes, the compiled code is cached under mirage's cache folder, and the plans that
stay eager are honoured and reported."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from mirage.backends import runtime
from mirage.backends.deepfloyd import load_stage
from mirage.backends.runtime import (
    COMPILE_MODE,
    compile_regions,
    inductor_cache_dir,
    uncompile_regions,
)
from mirage.backends.load import load_model
from mirage.backends.memory import Plan, PlanNote, note_plan
from mirage.engine.denoiser import Cond


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _calls(stage, batches=(2, 3), seed=0):
    """(x, t, cond) for the stage at each batch size, stage II with its image and level."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in batches:
        x = torch.randn(n, 3, stage.size, stage.size, generator=g)
        cond = Cond(embeds=torch.randn(n, 77, 32, generator=g))
        if stage.is_upscaler:
            cond = cond.with_image(torch.randn(n, 3, stage.size, stage.size, generator=g),
                                   torch.full((n,), 250, dtype=torch.long))
        out.append((x, 500 + 10 * n, cond))
    return out


def _agree(stage, backend: str, layout=None, atol=1e-5, scope="blocks"):
    calls = _calls(stage)
    with torch.inference_mode():
        eager = [stage(*c) for c in calls]
        n = compile_regions(stage.unet(), COMPILE_MODE, backend=backend, layout=layout, scope=scope)
        try:
            compiled = [stage(*c) for c in calls]
        finally:
            uncompile_regions(stage.unet())
        again = [stage(*calls[0])]
    assert n > 0
    for (e_eps, e_var), (c_eps, c_var) in zip(eager, compiled):
        assert torch.allclose(e_eps, c_eps, atol=atol), (e_eps - c_eps).abs().max()
        assert torch.allclose(e_var, c_var, atol=atol), (e_var - c_var).abs().max()
    assert torch.equal(again[0][0], eager[0][0])  # uncompile_regions gives back the plain modules


def test_compiled_blocks_agree_with_eager_through_dynamo(stages):
    """Both stages, two batch sizes, either layout, traced by dynamo (aot_eager: the graphs run as traced)."""
    one, two = stages
    _agree(one, "aot_eager", torch.channels_last)
    _agree(two, "aot_eager")


def test_one_compiled_graph_serves_other_batch_sizes(stages):
    one, _ = stages
    calls = _calls(one, batches=(2, 5, 7))
    with torch.inference_mode():
        compile_regions(one.unet(), COMPILE_MODE, backend="aot_eager")
        try:
            one(*calls[0])
            one(*calls[1])  # the batch dimension becomes symbolic, if it is not yet
            graphs = _unique_graphs()
            one(*calls[2])
            assert _unique_graphs() == graphs  # a third batch size compiles nothing
        finally:
            uncompile_regions(one.unet())


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code needs a C++ compiler")
def test_inductor_compiled_blocks_agree_with_eager_to_fp32_rounding(stages, monkeypatch):
    """The real backend, inductor, on stage I (its CPU code; on a GPU it writes Triton kernels)."""
    one, _ = stages
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    _agree(one, "inductor", atol=1e-4)
    # compiling placed inductor's cache in mirage's cache folder (MIRAGE_CACHE here, a test's folder)
    assert inductor_cache_dir() == runtime.default_cache_dir().parent / "inductor"
    assert any(inductor_cache_dir().iterdir())


def test_inductor_cache_goes_to_mirages_cache_folder_unless_the_user_chose_one(stages, monkeypatch, tmp_path):
    """Importing diffusers sets TORCHINDUCTOR_CACHE_DIR to inductor's default, /tmp/torchinductor_USER: that is
    no choice of the user's, and compiling moves it under mirage's cache (MIRAGE_CACHE here)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    unet = stages[0].unet()
    mirage = runtime.default_cache_dir().parent / "inductor"
    for before, after in ((None, mirage), (inductor_default(), mirage), (str(tmp_path / "mine"), tmp_path / "mine")):
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        assert inductor_cache_dir() == after
        compile_regions(unet, backend="inductor")  # nothing runs: only the blocks' forwards are replaced
        uncompile_regions(unet)
        assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == after


def test_compile_is_auto_by_default_and_forced_either_way(tiny_if_models):
    ref = str(tiny_if_models.stage_1)
    auto = load_stage(ref)
    assert auto.compile_request is None
    assert load_model(ref, torch.device("cpu"), compile=None).compile_request is None
    on, off = load_stage(ref, compile=True), load_stage(ref, compile=False)
    assert (on.compile, off.compile) == (COMPILE_MODE, None)
    cuda = torch.device("cuda")
    # the decision, per plan, for a UNet on a GPU (none is needed to decide)
    assert auto._why_eager(Plan("gpu"), cuda) is None  # resident: compiled
    assert "offload" in auto._why_eager(Plan("offload"), cuda)
    assert "stream" in auto._why_eager(Plan("blocks", budget=1 << 30), cuda)
    assert on._why_eager(Plan("offload"), cuda) is None  # forced on: offload compiles too
    assert "stream" in on._why_eager(Plan("blocks", budget=1 << 30), cuda)  # never under blocks
    assert off._why_eager(Plan("gpu"), cuda) == "compilation turned off"
    for stage in (auto, on, off):
        assert stage._why_eager(Plan("cpu"), torch.device("cpu")) is not None


def test_eager_plans_are_honoured_and_reported(tiny_if_models):
    """Off a GPU (plan cpu) and with compile forced on, the UNet runs eagerly, says so, and has no compiled
    block; nothing is noted off a GPU."""
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        for compile in (None, True, False):
            stage = load_stage(str(tiny_if_models.stage_1), compile=compile)
            unet = stage.unet()
            assert stage.plan.name == "cpu" and not stage.compiled
            assert stage.execution.startswith("eager (")
            assert not any("forward" in m.__dict__ for m in unet.modules())
            stage(*_calls(stage, batches=(1,))[0])
    assert not [n for n in notes if issubclass(n.category, PlanNote)]


def test_blocks_plan_runs_eager_with_its_streaming(tiny_if_models):
    stage = load_stage(str(tiny_if_models.stage_1), memory="blocks", compile=True)
    plain = load_stage(str(tiny_if_models.stage_1), memory="cpu")
    x, t, cond = _calls(stage, batches=(2,))[0]
    eps, var = stage(x, t, cond)
    assert stage.plan.name == "blocks" and not stage.compiled and "stream" in stage.execution
    assert torch.allclose(eps, plain(x, t, cond)[0], atol=1e-5)


def test_plans_are_noted_on_a_gpu_only():
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        note_plan("T5", Plan("blocks", budget=2**30), torch.device("cpu"))
        note_plan("T5", Plan("blocks", budget=2**30), torch.device("cuda"))  # a device's type, no GPU needed
    assert [str(n.message) for n in notes] == ["T5: memory plan blocks (1.0 GiB on the GPU)"]
    assert notes[0].category is PlanNote
