"""A diffusers ``AutoencoderKL`` decoder or encoder as a flat program of row-local steps.

The tiled VAE (``executor.py``) never calls the diffusers modules' forwards: it reads their weights
and walks this program over row strips. A *value* is the activation between two steps: value ``p``
is the input of step ``p`` (value 0 the program's input, value ``len(steps)`` its output). Every
step maps rows of its input value to rows of its output value and says which input rows a range of
output rows needs (its receptive field, clipped to the image), so that a strip computed through
any run of steps equals the same rows of the whole computation:

* :class:`Conv`: ``nn.Conv2d`` with explicit zero padding (rows outside the image are padding, not
  halo), stride and kernel from the module;
* :class:`Norm`: ``nn.GroupNorm`` (+ SiLU) through ``hrkernels.ops.group_norm_silu`` with the
  statistics of the whole input value (the executor gathers them beforehand);
* :class:`Upsample`: nearest x2 (``Upsample2D``'s interpolation);
* :class:`Residual`: ``(shortcut(value[source]) + x) / output_scale_factor``, the end of a
  ``ResnetBlock2D``;
* :class:`Attention`: the mid block's self-attention, global (each output row needs every input
  row): the executor runs it over the whole latent with SDPA, queries in strips.

Only the structures of ``AutoencoderKL`` as SD 1.5/2.x and SDXL (and SD3-like configs with other
channel counts) use are accepted; anything else raises :class:`UnsupportedVAEError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hrkernels.ops import group_norm_silu

__all__ = [
    "Attention",
    "Conv",
    "Grid",
    "Norm",
    "Program",
    "Residual",
    "Step",
    "UnsupportedVAEError",
    "Upsample",
    "decoder_program",
    "encoder_program",
]


class UnsupportedVAEError(TypeError):
    """The VAE (or one of its modules) is not a structure the tiled VAE handles."""


@dataclass(frozen=True)
class Grid:
    """The size of one image of a value: channels, height, width."""

    channels: int
    height: int
    width: int

    def row_elements(self) -> int:
        """Elements of one row of one image (``C * W``)."""
        return self.channels * self.width


class Step:
    """One row-local step. ``run(x, row0, start, stop, height, ...)`` takes a strip ``x``
    ``[B, C, rows, W]`` holding input rows ``[row0, row0 + rows)`` (they cover
    :meth:`input_rows` of ``[start, stop)``) and returns output rows ``[start, stop)``."""

    # Groups of the GroupNorm statistics this step needs of its input value (None: none).
    norm_groups: int | None = None

    def out_grid(self, grid: Grid) -> Grid:
        return grid

    def input_rows(self, start: int, stop: int, height: int) -> tuple[int, int]:
        """Input rows (clipped to ``[0, height)``) that output rows ``[start, stop)`` need."""
        return start, stop

    def flops(self, rows: int, grid_in: Grid, grid_out: Grid) -> float:
        """Multiply-adds x 2 of ``rows`` output rows of one image (convolutions and linears)."""
        return 0.0


def _crop(x: torch.Tensor, row0: int, start: int, stop: int) -> torch.Tensor:
    if start < row0 or stop > row0 + x.shape[2]:
        raise AssertionError(f"strip of rows [{row0}, {row0 + x.shape[2]}) does not hold rows "
                             f"[{start}, {stop})")
    return x[:, :, start - row0:stop - row0]


@dataclass(frozen=True, eq=False)
class Conv(Step):
    """``nn.Conv2d`` with zero padding ``(top, bottom, left, right)`` (``Downsample2D`` pads only
    the bottom and right)."""

    module: nn.Conv2d
    padding: tuple[int, int, int, int]

    def out_grid(self, grid: Grid) -> Grid:
        (kh, kw), (sh, sw) = self.module.kernel_size, self.module.stride
        top, bottom, left, right = self.padding
        return Grid(self.module.out_channels, (grid.height + top + bottom - kh) // sh + 1,
                    (grid.width + left + right - kw) // sw + 1)

    def _needed(self, start: int, stop: int) -> tuple[int, int]:
        kh, sh = self.module.kernel_size[0], self.module.stride[0]
        top = self.padding[0]
        return sh * start - top, sh * (stop - 1) - top + kh

    def input_rows(self, start: int, stop: int, height: int) -> tuple[int, int]:
        first, last = self._needed(start, stop)
        return max(first, 0), min(last, height)

    def flops(self, rows: int, grid_in: Grid, grid_out: Grid) -> float:
        kh, kw = self.module.kernel_size
        return 2.0 * kh * kw * self.module.in_channels * grid_out.row_elements() * rows

    def run(self, x: torch.Tensor, row0: int, start: int, stop: int, height: int,
            **_: Any) -> torch.Tensor:
        first, last = self._needed(start, stop)
        x = _crop(x, row0, max(first, 0), min(last, height))
        top, bottom = max(-first, 0), max(last - height, 0)
        left, right = self.padding[2:]
        weight, bias, stride = self.module.weight, self.module.bias, self.module.stride
        if stride[0] == 1 and left == right:
            # Pad both ends by the larger need and drop the extra output row(s): no padded copy.
            # A strip of a stored value is a strided view, which the convolution would copy
            # anyway: done here, where it can be seen.
            pad = max(top, bottom)
            out = F.conv2d(x.contiguous(), weight, bias, stride, (pad, left))
            return out[:, :, pad - top:pad - top + stop - start]
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride)


@dataclass(frozen=True, eq=False)
class Norm(Step):
    """``nn.GroupNorm`` (then SiLU when ``silu``) with the whole input value's statistics."""

    module: nn.GroupNorm
    silu: bool

    @property
    def norm_groups(self) -> int:  # type: ignore[override]
        return self.module.num_groups

    @property
    def eps(self) -> float:
        return self.module.eps

    def run(self, x: torch.Tensor, row0: int, start: int, stop: int, height: int,
            statistics: tuple[torch.Tensor, torch.Tensor], **_: Any) -> torch.Tensor:
        mean, rstd = statistics
        return group_norm_silu(_crop(x, row0, start, stop), mean, rstd, self.module.weight,
                               self.module.bias, self.silu)


@dataclass(frozen=True, eq=False)
class Upsample(Step):
    """Nearest-neighbour x2 (output row ``r`` is input row ``r // 2``)."""

    def out_grid(self, grid: Grid) -> Grid:
        return Grid(grid.channels, 2 * grid.height, 2 * grid.width)

    def input_rows(self, start: int, stop: int, height: int) -> tuple[int, int]:
        return start // 2, (stop + 1) // 2

    def run(self, x: torch.Tensor, row0: int, start: int, stop: int, height: int,
            **_: Any) -> torch.Tensor:
        first, last = self.input_rows(start, stop, height)
        up = F.interpolate(_crop(x, row0, first, last), scale_factor=2.0, mode="nearest")
        return up[:, :, start - 2 * first:stop - 2 * first]


@dataclass(frozen=True, eq=False)
class Residual(Step):
    """``(shortcut(value[source]) + x) / scale``: the skip of a ``ResnetBlock2D`` (``shortcut`` a
    1x1 ``nn.Conv2d`` or None)."""

    source: int
    shortcut: nn.Conv2d | None
    scale: float

    def flops(self, rows: int, grid_in: Grid, grid_out: Grid) -> float:
        if self.shortcut is None:
            return 0.0
        return 2.0 * self.shortcut.in_channels * grid_out.row_elements() * rows

    def run(self, x: torch.Tensor, row0: int, start: int, stop: int, height: int,
            source: tuple[torch.Tensor, int], **_: Any) -> torch.Tensor:
        skip = _crop(*source, start, stop)
        if self.shortcut is not None:  # (a strided view is copied here, not inside the conv)
            skip = F.conv2d(skip.contiguous(), self.shortcut.weight, self.shortcut.bias)
        out = skip + _crop(x, row0, start, stop)
        return out if self.scale == 1.0 else out / self.scale


@dataclass(frozen=True, eq=False)
class Attention(Step):
    """The mid block's ``Attention`` (single- or multi-head self-attention over all positions,
    with its GroupNorm, residual and output rescale). Global: run by the executor on the whole
    value (``executor.run_attention``)."""

    module: nn.Module

    @property
    def norm_groups(self) -> int | None:  # type: ignore[override]
        norm = self.module.group_norm
        return None if norm is None else norm.num_groups

    @property
    def eps(self) -> float:
        return self.module.group_norm.eps

    def input_rows(self, start: int, stop: int, height: int) -> tuple[int, int]:
        return 0, height

    def flops(self, rows: int, grid_in: Grid, grid_out: Grid) -> float:
        tokens = rows * grid_out.width
        channels = grid_in.channels
        # q, k, v and out projections, and QK^T and PV over every key (grid_in.height rows).
        return 8.0 * tokens * channels * channels + 4.0 * tokens * channels * (
            grid_in.height * grid_in.width)


@dataclass(frozen=True)
class Program:
    """The steps of a decoder or encoder, and where its blocks end.

    Attributes:
        steps: the steps in order (value ``p`` is the input of ``steps[p]``).
        blocks: values at which a block ends (a ResNet block, the attention, an up/down sampler,
            ``conv_in``): the natural checkpoints of the executor.
        in_channels: channels of value 0.
    """

    steps: tuple[Step, ...]
    blocks: frozenset[int]
    in_channels: int

    def grids(self, height: int, width: int) -> list[Grid]:
        """The grid of every value (``len(steps) + 1``) for an input of ``height x width``."""
        grids = [Grid(self.in_channels, height, width)]
        for step in self.steps:
            grids.append(step.out_grid(grids[-1]))
        return grids

    def row_ranges(self, start: int, stop: int, first: int, last: int,
                   grids: list[Grid]) -> list[tuple[int, int]]:
        """Rows of values ``start .. stop`` that rows ``[first, last)`` of value ``stop`` need
        through steps ``start .. stop - 1`` (a residual's source needs its rows too)."""
        ranges = [(0, 0)] * (stop - start + 1)
        ranges[-1] = (first, last)
        extra: dict[int, tuple[int, int]] = {}
        for p in range(stop - 1, start - 1, -1):
            step = self.steps[p]
            out_first, out_last = ranges[p + 1 - start]
            if isinstance(step, Residual) and step.source >= start:
                extra[step.source] = _hull(extra.get(step.source), (out_first, out_last))
            needed = step.input_rows(out_first, out_last, grids[p].height)
            ranges[p - start] = _hull(extra.pop(p, None), needed)
        return ranges


def _hull(a: tuple[int, int] | None, b: tuple[int, int]) -> tuple[int, int]:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


# --------------------------------------------------------------------------------------------------
# Building programs from diffusers modules
# --------------------------------------------------------------------------------------------------


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedVAEError(f"hrkernels.vae: unsupported VAE structure: {what}")


def _module_of(module: Any, kind: type, name: str) -> Any:
    """``module`` if its class is exactly ``kind`` and no forward is patched on the instance (but
    accelerate's offload hook, which moves weights and leaves the computation alone: the caller
    loads the weights through it, :func:`hrkernels.vae._offloaded_modules`)."""
    _require(type(module) is kind, f"{name} is a {type(module).__name__}, not a "
             f"{kind.__name__} (subclasses, LoRA layers and other wrappers are not handled)")
    offload_hooked = hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")
    _require("forward" not in vars(module) or offload_hooked, f"{name} has a patched forward")
    return module


def _conv(module: Any, name: str, extra: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Conv:
    conv = _module_of(module, nn.Conv2d, name)
    _require(conv.groups == 1 and tuple(conv.dilation) == (1, 1)
             and conv.padding_mode == "zeros" and not isinstance(conv.padding, str),
             f"{name} must be a plain convolution (groups 1, dilation 1, integer zero padding); "
             f"got {conv}")
    ph, pw = conv.padding
    padding = (ph + extra[0], ph + extra[1], pw + extra[2], pw + extra[3])
    return Conv(conv, padding)


def _group_norm(module: Any, name: str, silu: bool) -> Norm:
    norm = _module_of(module, nn.GroupNorm, name)
    _require(norm.affine, f"{name} must be an affine GroupNorm")
    return Norm(norm, silu)


def _silu(module: Any, name: str) -> None:
    _require(type(module) is nn.SiLU, f"{name} must be SiLU; got {type(module).__name__}")


class _Builder:
    """Appends steps and records block ends."""

    def __init__(self, in_channels: int):
        self.in_channels = in_channels
        self.steps: list[Step] = []
        self.blocks: set[int] = set()

    def add(self, *steps: Step, block: bool = False) -> None:
        self.steps.extend(steps)
        if block:
            self.blocks.add(len(self.steps))

    def resnet(self, resnet: Any, name: str) -> None:
        from diffusers.models.resnet import ResnetBlock2D

        _module_of(resnet, ResnetBlock2D, name)
        _require(resnet.time_emb_proj is None and resnet.time_embedding_norm != "scale_shift",
                 f"{name} takes a time embedding")
        _require(resnet.upsample is None and resnet.downsample is None,
                 f"{name} resamples inside the block")
        _require(not resnet.training or resnet.dropout.p == 0,
                 f"{name} has active dropout (call vae.eval())")
        _silu(resnet.nonlinearity, f"{name}.nonlinearity")
        shortcut = None
        if resnet.conv_shortcut is not None:
            shortcut = _conv(resnet.conv_shortcut, f"{name}.conv_shortcut").module
            _require(tuple(shortcut.kernel_size) == (1, 1) and tuple(shortcut.stride) == (1, 1)
                     and tuple(shortcut.padding) == (0, 0), f"{name}.conv_shortcut must be 1x1")
        source = len(self.steps)
        self.add(_group_norm(resnet.norm1, f"{name}.norm1", True),
                 _conv(resnet.conv1, f"{name}.conv1"),
                 _group_norm(resnet.norm2, f"{name}.norm2", True),
                 _conv(resnet.conv2, f"{name}.conv2"),
                 Residual(source, shortcut, float(resnet.output_scale_factor)), block=True)

    def resnets(self, block: Any, kind: type, name: str) -> None:
        """The ResNet blocks of an up or down block of class ``kind``."""
        _module_of(block, kind, name)
        for number, resnet in enumerate(block.resnets):
            self.resnet(resnet, f"{name}.resnets.{number}")

    def attention(self, attention: Any, name: str) -> None:
        from diffusers.models.attention_processor import Attention as DiffusersAttention
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        _module_of(attention, DiffusersAttention, name)
        _require(type(attention.processor) in (AttnProcessor, AttnProcessor2_0),
                 f"{name} uses the attention processor {type(attention.processor).__name__} "
                 "(only AttnProcessor and AttnProcessor2_0 are reproduced)")
        _require(attention.spatial_norm is None and attention.norm_q is None
                 and attention.norm_k is None and attention.norm_cross is None
                 and attention.added_kv_proj_dim is None and not attention.is_cross_attention,
                 f"{name} is not a plain self-attention (spatial/q/k/cross norms or added "
                 "key-value projections)")
        for part in ("to_q", "to_k", "to_v"):
            _module_of(getattr(attention, part), nn.Linear, f"{name}.{part}")
        _module_of(attention.to_out[0], nn.Linear, f"{name}.to_out.0")
        channels = attention.to_q.in_features
        head_dim = attention.inner_dim // attention.heads
        _require(attention.inner_kv_dim == attention.inner_dim
                 and attention.to_out[0].out_features == channels
                 and attention.scale == head_dim ** -0.5,
                 f"{name}: keys, values and output must match the queries' width and the scale "
                 "must be 1/sqrt(head_dim)")
        _require(not attention.training or attention.to_out[1].p == 0,
                 f"{name} has active dropout (call vae.eval())")
        if attention.group_norm is not None:
            _module_of(attention.group_norm, nn.GroupNorm, f"{name}.group_norm")
        self.add(Attention(attention), block=True)

    def mid_block(self, mid: Any, name: str) -> None:
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

        _module_of(mid, UNetMidBlock2D, name)
        self.resnet(mid.resnets[0], f"{name}.resnets.0")
        for index, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:],
                                                        strict=True)):
            if attention is not None:
                self.attention(attention, f"{name}.attentions.{index}")
            self.resnet(resnet, f"{name}.resnets.{index + 1}")

    def output(self, norm: Any, act: Any, conv: Any, name: str) -> None:
        _silu(act, f"{name}.conv_act")
        self.add(_group_norm(norm, f"{name}.conv_norm_out", True),
                 _conv(conv, f"{name}.conv_out"))

    def program(self) -> Program:
        return Program(tuple(self.steps), frozenset(self.blocks), self.in_channels)


def _check_autoencoder(vae: Any) -> None:
    from diffusers import AutoencoderKL

    _require(isinstance(vae, AutoencoderKL),
             f"the VAE is a {type(vae).__name__}; only diffusers' AutoencoderKL is handled")


def decoder_program(vae: Any) -> Program:
    """The steps of ``vae.post_quant_conv`` and ``vae.decoder`` (an ``AutoencoderKL``).

    Raises:
        UnsupportedVAEError: another class, or a module the tiled VAE does not reproduce.
    """
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
    from diffusers.models.upsampling import Upsample2D

    _check_autoencoder(vae)
    decoder = _module_of(vae.decoder, Decoder, "decoder")
    builder = _Builder(vae.config.latent_channels)
    if vae.post_quant_conv is not None:
        builder.add(_conv(vae.post_quant_conv, "post_quant_conv"))
    builder.add(_conv(decoder.conv_in, "decoder.conv_in"), block=True)
    builder.mid_block(decoder.mid_block, "decoder.mid_block")
    for index, block in enumerate(decoder.up_blocks):
        name = f"decoder.up_blocks.{index}"
        builder.resnets(block, UpDecoderBlock2D, name)
        for number, upsampler in enumerate(block.upsamplers or ()):
            where = f"{name}.upsamplers.{number}"
            _module_of(upsampler, Upsample2D, where)
            _require(upsampler.interpolate and not upsampler.use_conv_transpose
                     and upsampler.norm is None, f"{where} must be a nearest x2 upsampler")
            builder.add(Upsample())
            if upsampler.use_conv:
                conv = upsampler.conv if upsampler.name == "conv" else upsampler.Conv2d_0
                builder.add(_conv(conv, f"{where}.conv"))
            builder.blocks.add(len(builder.steps))
    builder.output(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out, "decoder")
    return builder.program()


def encoder_program(vae: Any) -> Program:
    """The steps of ``vae.encoder`` and ``vae.quant_conv`` (an ``AutoencoderKL``): the output is
    the posterior's moments ``[mean, logvar]``.

    Raises:
        UnsupportedVAEError: another class, or a module the tiled VAE does not reproduce.
    """
    from diffusers.models.autoencoders.vae import Encoder
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D

    _check_autoencoder(vae)
    encoder = _module_of(vae.encoder, Encoder, "encoder")
    builder = _Builder(vae.config.in_channels)
    builder.add(_conv(encoder.conv_in, "encoder.conv_in"), block=True)
    for index, block in enumerate(encoder.down_blocks):
        name = f"encoder.down_blocks.{index}"
        builder.resnets(block, DownEncoderBlock2D, name)
        for number, downsampler in enumerate(block.downsamplers or ()):
            where = f"{name}.downsamplers.{number}"
            _module_of(downsampler, Downsample2D, where)
            _require(downsampler.use_conv and downsampler.norm is None,
                     f"{where} must be a strided convolution")
            # padding=0: diffusers pads one row and column at the bottom and right first.
            extra = (0, 1, 0, 1) if downsampler.padding == 0 else (0, 0, 0, 0)
            builder.add(_conv(downsampler.conv, f"{where}.conv", extra), block=True)
    builder.mid_block(encoder.mid_block, "encoder.mid_block")
    builder.output(encoder.conv_norm_out, encoder.conv_act, encoder.conv_out, "encoder")
    if vae.quant_conv is not None:
        builder.add(_conv(vae.quant_conv, "quant_conv"))
    return builder.program()
