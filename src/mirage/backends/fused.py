"""Compilation's fused scope: only the UNet's elementwise work is compiled, the convolutions, matrix products
and attention stay eager (cuDNN's, cuBLAS's, SDPA's).

A diffusers UNet spends much of its time outside its convolutions: each group norm, activation, time-embedding
scale-shift and residual sum reads and writes the whole activation (40 % of IF stage I's GPU time eagerly,
bench/if_profile_h100.log). Here those run as a few compiled functions with every size symbolic, each called by
every block of every width, resolution and batch (on [B, C, L] views of its maps): a resnet's norm, shift and
activation become one kernel, its residual sum another, each adding the bias of the convolution before it (which
PyTorch would add in a kernel of its own). So there is little to compile (a few graphs for a whole UNet, where
compiling whole blocks makes one per kind and width), at the price of the other fusions across a convolution's
edges that compiled blocks get.

`fuse` replaces the forwards of a UNet's resnet blocks (with `resnet_forward`, the same computation as
diffusers' ResnetBlock2D.forward at inference) and of its other group norms; removing the instance attribute
`forward` undoes it. Blocks this does not cover (training, an activation other than SiLU/GELU/Mish, norms that
are not affine group norms) keep their own forward.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"silu": F.silu, "mish": F.mish, "gelu": F.gelu,
                "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), None: lambda x: x}


def _activation_name(module: nn.Module) -> str | None | bool:
    """The name of `module`'s activation in _ACTIVATIONS; False where it has none of those."""
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.Mish):
        return "mish"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return False


def _like(y: Tensor, x: Tensor, channels_inner: bool) -> Tensor:
    # the output in the input's layout: channels innermost stays so (NHWC, or attention's transposed tokens), so
    # that the next convolution or projection gets what it expects without a copy
    return y.movedim(1, -1).contiguous().movedim(-1, 1) if channels_inner else y


def _plus(x: Tensor, before: Tensor | None) -> Tensor:
    return x if before is None else x + before


def norm_act(x: Tensor, before: Tensor | None, weight: Tensor, bias: Tensor, groups: int, eps: float,
             act: str | None, channels_inner: bool) -> Tensor:
    """act(group_norm(x + before)): `before` the previous convolution's bias (and a resnet's time embedding)."""
    y = F.group_norm(_plus(x, before), groups, weight, bias, eps)
    return _like(_ACTIVATIONS[act](y), x, channels_inner)


def scale_shift_norm_act(x: Tensor, before: Tensor | None, temb: Tensor, weight: Tensor, bias: Tensor, groups: int,
                         eps: float, act: str | None, channels_inner: bool) -> Tensor:
    """act(group_norm(x + before) * (1 + scale) + shift), scale and shift the two halves of the time embedding."""
    scale, shift = temb.chunk(2, dim=1)
    y = F.group_norm(_plus(x, before), groups, weight, bias, eps) * (1 + scale) + shift
    return _like(_ACTIVATIONS[act](y), x, channels_inner)


def residual(h: Tensor, x: Tensor, before: Tensor | None, channels_inner: bool) -> Tensor:
    """x + h + before, in h's layout."""
    return _like(x + _plus(h, before), h, channels_inner)


_FUNCTIONS = dict(norm_act=norm_act, scale_shift_norm_act=scale_shift_norm_act, residual=residual)


# The norms' weights are parameters, whose sizes dynamo would hold static (and with them the channels). The
# groups and eps are constants of a model: made symbolic, as dynamic=True would, they are specialized
# while tracing, and the trace restarts and compiles its graph again. Past recompile_limit graphs of one function
# dynamo would run the rest eagerly, unannounced: each layout, activation and grad mode is a graph, so room.
_DYNAMO_SETTINGS = dict(force_parameter_static_shapes=False, specialize_int=True, specialize_float=True,
                        recompile_limit=64)
# Sizes equal in the first trace (channels and tokens both 64, say) would be one symbol ("duck shaping"), and a
# later call where they differ a new graph.
_SHAPE_SETTINGS = dict(use_duck_shape=False)


def _symbolic(fn):
    @functools.wraps(fn)
    def call(*args):
        with torch._dynamo.config.patch(**_DYNAMO_SETTINGS), torch.fx.experimental._config.patch(**_SHAPE_SETTINGS):
            return fn(*args)
    return call


@functools.cache
def compiled(backend: str) -> dict:
    """The functions above compiled by `backend`, every size symbolic (batch, channels, tokens): one graph each
    serves every block (dynamo still specializes sizes 0 and 1, the strides' order, and each flag's value)."""
    return {name: _symbolic(torch.compile(fn, dynamic=True, backend=backend)) for name, fn in _FUNCTIONS.items()}


def _tokens(t):
    """[B, C, *spatial] as [B, C, L] (a view, in either layout): the compiled functions see one rank, so one graph
    serves the resnets' maps, attention's tokens and the time embeddings."""
    return t.flatten(2) if isinstance(t, Tensor) and t.dim() > 3 else t


def _call(fn, x: Tensor, *args) -> Tensor:
    """fn on `x` and `args` as tokens, its result in `x`'s shape."""
    return fn(_tokens(x), *map(_tokens, args)).reshape(x.shape)  # a view, unless the layout forbids one


def _channels_inner(x: Tensor) -> bool:
    return x.dim() > 2 and x.shape[1] > 1 and x.stride(1) == 1


def _norm_args(norm: nn.GroupNorm) -> tuple:
    return norm.weight, norm.bias, norm.num_groups, norm.eps


def fusable_norm(norm) -> bool:
    return isinstance(norm, nn.GroupNorm) and norm.affine


def fusable_resnet(block: nn.Module) -> bool:
    """Whether `resnet_forward` computes what `block` (a diffusers ResnetBlock2D) does."""
    return (not block.training and fusable_norm(block.norm1) and fusable_norm(block.norm2)
            and _activation_name(block.nonlinearity) is not False
            and block.time_embedding_norm in ("default", "scale_shift"))


def _unbiased(conv: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """conv(x) less its bias, and the bias as [C, 1], for the next compiled function to add: PyTorch adds a cuDNN
    convolution's bias in a kernel of its own, one more pass over the whole output."""
    if isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward and conv.bias is not None:
        return conv._conv_forward(x, conv.weight, None), conv.bias[:, None]
    return conv(x), None


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def resnet_forward(fns: dict, block: nn.Module, x: Tensor, temb: Tensor | None) -> Tensor:
    """diffusers' ResnetBlock2D.forward at inference, its elementwise work (the convolutions' biases included) by
    the compiled `fns`."""
    act, inner = _activation_name(block.nonlinearity), _channels_inner(x)
    h = _call(fns["norm_act"], x, None, *_norm_args(block.norm1), act, inner)
    resample = block.upsample or block.downsample
    if resample is not None:
        if block.upsample is not None and h.shape[0] >= 64:  # as diffusers: nearest upsampling fails in NHWC
            x, h = x.contiguous(), h.contiguous()
        x, h = resample(x), resample(h)
    h, before = _unbiased(block.conv1, h)
    if block.time_emb_proj is not None and temb is not None:
        temb = block.time_emb_proj(temb if block.skip_time_act else block.nonlinearity(temb))[:, :, None]
    if block.time_embedding_norm == "scale_shift":
        h = _call(fns["scale_shift_norm_act"], h, before, temb, *_norm_args(block.norm2), act, inner)
    else:  # the time embedding, [B, C, 1], added before the norm with the bias
        h = _call(fns["norm_act"], h, _sum(before, temb), *_norm_args(block.norm2), act, inner)
    h, after = _unbiased(block.conv2, h)  # dropout is the identity at inference
    if block.conv_shortcut is not None:  # with its bias: a sum of two would be a new tensor, and under inference
        x = block.conv_shortcut(x)  # mode one of other dispatch keys than the bias alone, so another graph
    out = _call(fns["residual"], h, x, after, _channels_inner(h))
    # a factor other than 1 (IF-II's two mid-block resnets, at its lowest resolution) is divided eagerly: as a
    # constant of the compiled function it would be a graph of its own, seconds of compiling for two small blocks
    return out if block.output_scale_factor == 1 else out / block.output_scale_factor


def norm_forward(fns: dict, norm: nn.GroupNorm, x: Tensor) -> Tensor:
    return _call(fns["norm_act"], x, None, *_norm_args(norm), None, _channels_inner(x))


def fuse(unet: nn.Module, resnet_class: type, backend: str) -> int:
    """Run `unet`'s resnet blocks (instances of `resnet_class`) and its other group norms through the compiled
    functions, in place; returns how many modules now do."""
    fns, count = compiled(backend), 0
    inside = set()
    for block in unet.modules():
        if isinstance(block, resnet_class) and fusable_resnet(block):
            block.forward = functools.partial(resnet_forward, fns, block)
            inside.update((id(block.norm1), id(block.norm2)))
            count += 1
    for norm in unet.modules():
        if fusable_norm(norm) and id(norm) not in inside:
            norm.forward = functools.partial(norm_forward, fns, norm)
            count += 1
    return count
