"""Compilation's fused scope (fused.py): the resnets' and group norms' elementwise work compiled with every size
symbolic. Its resnet forward computes what diffusers' does, keeps the input's layout, serves every width and
batch size of both IF stages with a few graphs (fewer than compiling whole blocks), and leaves alone the blocks
it does not cover."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from test_if_compile import _agree, _calls, _unique_graphs
import tiny_sd

from mirage.app.main import build_parser, main
from mirage.app.settings import resolve
from mirage.backends import fused
from mirage.backends.deepfloyd import load_stage
from mirage.backends.load import load_model
from mirage.backends.runtime import COMPILE_SCOPE, compile_regions, uncompile_regions


def test_fused_scope_agrees_with_eager_on_both_if_stages(stages):
    """Stage I in NHWC (as on a GPU), stage II in NCHW, two batch sizes, traced by dynamo (aot_eager)."""
    one, two = stages
    _agree(one, "aot_eager", torch.channels_last, scope="fused")
    _agree(two, "aot_eager", scope="fused")


def _graphs_for(stages, scope: str, batches) -> int:
    """New dynamo graphs while both stages run at `batches` with `scope`."""
    torch._dynamo.reset()  # nothing compiled before counts
    before = _unique_graphs()
    with torch.inference_mode():
        for stage in stages:
            compile_regions(stage.unet(), backend="aot_eager", scope=scope)
            try:
                for call in _calls(stage, batches):
                    stage(*call)
            finally:
                uncompile_regions(stage.unet())
    return _unique_graphs() - before


def test_fused_scope_serves_every_width_and_batch_with_fewer_graphs_than_blocks(stages):
    fused_graphs = _graphs_for(stages, "fused", (2, 3))
    torch._dynamo.reset()
    with torch.inference_mode():
        for stage in stages:
            compile_regions(stage.unet(), backend="aot_eager", scope="fused")
            for call in _calls(stage, (2, 3)):
                stage(*call)
        before = _unique_graphs()
        try:
            for stage in stages:  # other batch sizes: nothing new to compile
                for call in _calls(stage, (5, 7)):
                    stage(*call)
        finally:
            for stage in stages:
                uncompile_regions(stage.unet())
    assert _unique_graphs() == before
    blocks_graphs = _graphs_for(stages, "blocks", (2, 3))
    print(f"graphs for both tiny stages: fused {fused_graphs}, blocks {blocks_graphs}")
    assert fused_graphs < blocks_graphs


def test_each_fused_graph_is_traced_and_compiled_once(stages):
    """No trace restarts: a restart (a symbolic group count or eps specialized while tracing) compiles the graph
    again, which doubled fused's compile time."""
    from torch._dynamo.utils import counters

    counters.clear()
    graphs = _graphs_for(stages, "fused", (2, 3))
    assert graphs > 0
    assert counters["aot_autograd"]["total"] == graphs


def _norm_graphs(cases) -> int:
    """New dynamo graphs while fused's group norm runs each (norm, input) of `cases` (made under inference mode,
    as the sampler makes its tensors), each result checked against the norm's own."""
    torch._dynamo.reset()
    fns, before = fused.compiled("aot_eager"), _unique_graphs()
    with torch.inference_mode():
        for norm, x in cases:
            torch.testing.assert_close(fused.norm_forward(fns, norm, x), norm(x))
    return _unique_graphs() - before


def test_attention_tokens_and_nhwc_maps_share_one_norm_graph():
    """The compiled functions see [B, C, L]: a norm over attention's transposed tokens and one over an NHWC map,
    of any widths, are one graph."""
    def cases():
        for width in (16, 32):
            norm = torch.nn.GroupNorm(4, width).eval()
            yield norm, torch.randn(2, 20, width).transpose(1, 2)  # attention's tokens
            yield norm, torch.randn(3, width, 6, 5).contiguous(memory_format=torch.channels_last)

    assert _norm_graphs(cases()) == 1


def test_sizes_equal_in_the_first_trace_stay_two_symbols():
    """Channels and tokens both 16 in the first call, then 20 tokens: one graph (duck shaping would make two)."""
    norm = torch.nn.GroupNorm(4, 16).eval()
    assert _norm_graphs((norm, torch.randn(3, 16, tokens)) for tokens in (16, 20)) == 1


def test_more_variants_than_dynamos_default_limit_all_run_compiled():
    """Past recompile_limit (8) dynamo would run a function's further variants eagerly, saying nothing."""
    torch._dynamo.reset()
    fns, before = fused.compiled("aot_eager"), _unique_graphs()
    norm = torch.nn.GroupNorm(4, 16).eval()
    with torch.inference_mode():
        for act in fused._ACTIVATIONS:  # 5 activations x 2 layouts: 10 graphs of norm_act
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(2, 16, 4, 4).contiguous(memory_format=layout)
                fns["norm_act"](fused._tokens(x), None, *fused._norm_args(norm), act, layout == torch.channels_last)
    assert _unique_graphs() - before == 10


def _resnets():
    """Resnet blocks as Stable Diffusion and IF build them: SiLU or GELU, the time embedding added or as
    scale-shift, with and without a shortcut and a down or up sampler."""
    torch.manual_seed(0)
    kw = dict(temb_channels=24, groups=8, eps=1e-6)
    blocks = [ResnetBlock2D(in_channels=16, out_channels=16, **kw),
              ResnetBlock2D(in_channels=16, out_channels=32, non_linearity="gelu", time_embedding_norm="scale_shift",
                            **kw),
              ResnetBlock2D(in_channels=16, out_channels=16, down=True, output_scale_factor=1.414, **kw),
              ResnetBlock2D(in_channels=16, out_channels=32, up=True, skip_time_act=True, **kw),
              ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=None, groups=8)]
    for block in blocks:  # affine parameters away from their 1 and 0, so that a slip shows
        for norm in (block.norm1, block.norm2):
            torch.nn.init.normal_(norm.weight)
            torch.nn.init.normal_(norm.bias)
    return [block.eval() for block in blocks]


def test_fused_resnet_forward_computes_diffusers_forward_and_keeps_the_layout():
    fns = fused.compiled("aot_eager")
    x, temb = torch.randn(3, 16, 8, 8), torch.randn(3, 24)
    for block in _resnets():
        assert fused.fusable_resnet(block)
        emb = temb if block.time_emb_proj is not None else None
        with torch.inference_mode():
            want = block(x, emb)
            for layout in (torch.contiguous_format, torch.channels_last):
                got = fused.resnet_forward(fns, block, x.contiguous(memory_format=layout), emb)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                if block.upsample is None:  # nearest upsampling's own layout is diffusers' to choose
                    assert got.is_contiguous(memory_format=layout)


def test_fused_resnets_convolve_without_bias_and_add_it_in_the_compiled_functions():
    """PyTorch adds a cuDNN convolution's bias in a kernel of its own: the fused forward leaves conv1's and
    conv2's to the compiled function after each, whose kernel runs anyway."""
    from torch.overrides import TorchFunctionMode

    class Convolutions(TorchFunctionMode):
        biases = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (F.conv2d, torch.conv2d):
                self.biases.append(args[2] if len(args) > 2 else (kwargs or {}).get("bias"))
            return func(*args, **(kwargs or {}))

    fns = fused.compiled("aot_eager")
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    for block in _resnets():
        emb = temb if block.time_emb_proj is not None else None
        with torch.inference_mode(), Convolutions() as mode:
            fused.resnet_forward(fns, block, x, emb)
        assert len(mode.biases) == 2 + (block.conv_shortcut is not None)
        assert mode.biases[:2] == [None, None]  # conv1's and conv2's (the shortcut keeps its own)
        mode.biases.clear()


def test_a_residual_factor_other_than_one_is_no_graph_of_its_own():
    """IF-II's mid-block resnets divide their sum by 1.414: that block compiles nothing the others have not."""
    torch.manual_seed(0)
    kw = dict(in_channels=16, out_channels=16, temb_channels=24, groups=8, eps=1e-6)
    plain, scaled = (ResnetBlock2D(output_scale_factor=f, **kw).eval() for f in (1.0, 1.414))
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    torch._dynamo.reset()
    fns = fused.compiled("aot_eager")
    with torch.inference_mode():
        fused.resnet_forward(fns, plain, x, temb)
        before = _unique_graphs()
        got = fused.resnet_forward(fns, scaled, x, temb)
        torch.testing.assert_close(got, scaled(x, temb), atol=1e-5, rtol=1e-5)
    assert _unique_graphs() == before


def test_fused_group_norm_keeps_attentions_transposed_tokens():
    """Attention normalizes its (batch, tokens, channels) input transposed: the output keeps those strides."""
    norm = torch.nn.GroupNorm(4, 16).eval()
    tokens = torch.randn(2, 10, 16)
    with torch.inference_mode():
        got = fused.norm_forward(fused.compiled("aot_eager"), norm, tokens.transpose(1, 2))
        torch.testing.assert_close(got, norm(tokens.transpose(1, 2)))
    assert got.transpose(1, 2).is_contiguous()


def test_fuse_covers_a_stable_diffusion_unet_and_leaves_what_it_cannot_compute():
    torch.manual_seed(0)
    unet = tiny_sd.unet()
    odd = next(m for m in unet.modules() if isinstance(m, ResnetBlock2D))
    odd.nonlinearity = torch.nn.ReLU()  # not one of the activations fused.py computes
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, tiny_sd.WIDTH)
    with torch.inference_mode():
        want = unet(x, t, encoder_hidden_states=text).sample
        count = fused.fuse(unet, ResnetBlock2D, "aot_eager")
        try:
            got = unet(x, t, encoder_hidden_states=text).sample
            assert "forward" not in odd.__dict__ and "forward" in odd.norm1.__dict__  # its norms alone
            resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
            norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
            assert count == len(resnets) - 1 + len(norms) - 2 * (len(resnets) - 1)
        finally:
            uncompile_regions(unet)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_if_stage_two_is_nhwc_exactly_where_the_fused_scope_compiles_it(tiny_if_models):
    """Eager NHWC group norms are slow (IF-II-L 30 % slower); compiled by the fused scope NHWC is faster."""
    one = str(tiny_if_models.stage_1)
    two = {compile: load_stage(str(tiny_if_models.stage_2), text_encoder_from=one, compile=compile)
           for compile in ("fused", "blocks", False, None)}
    assert [two[c]._wants_nhwc(compiled=True) for c in two] == [True, False, False, False]
    assert not two["fused"]._wants_nhwc(compiled=False)  # a plan that stays eager: NCHW
    stage_one = load_stage(one, compile=False)
    assert stage_one._wants_nhwc(compiled=False)  # IF-I is NHWC either way
    assert not two["fused"].nhwc  # off a GPU nothing is NHWC
    two["fused"].unet()
    assert not two["fused"].nhwc and two["fused"].unet().conv_in.weight.is_contiguous()


def test_an_unknown_scope_is_refused(stages):
    with pytest.raises(ValueError, match="one of blocks, fused"):
        compile_regions(stages[0].unet(), backend="aot_eager", scope="everything")


def test_the_cli_chooses_the_scope_and_refuses_it_without_compile(stages, tiny_if_models, capsys):
    ref = str(tiny_if_models.stage_1)

    def settings(*extra):
        argv = ["sample", "--model", ref, "--prompt", "a cat", *extra]
        args = build_parser().parse_args(argv)
        args.argv = argv
        return resolve(args, "sample")

    assert settings().compile is False
    assert settings("--compile").compile == COMPILE_SCOPE == "blocks"
    chosen = settings("--compile", "--compile-scope", "fused").compile
    assert load_model(ref, torch.device("cpu"), compile=chosen).compile_scope == "fused"
    assert load_model(ref, torch.device("cpu"), compile=True).compile_scope == "blocks"
    assert main(["sample", "--model", ref, "--prompt", "a cat", "--compile-scope", "fused"]) == 2
    assert "add --compile" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one of blocks, fused"):
        load_model(ref, torch.device("cpu"), compile="everything")
