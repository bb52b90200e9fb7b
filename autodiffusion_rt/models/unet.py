"""The ADM UNet of openai/guided-diffusion, with per-layer skipping.

Constructor arguments, module tree and state_dict keys are those of
guided-diffusion's ``UNetModel``, so its checkpoints load with ``strict=True``
and compute the same function. What we add:

* a layer registry (``model.layers``): every ResBlock and attention block, with
  its id (its module path, e.g. ``input_blocks.1.0``), kind, resolution,
  channels and the MACs per sample that skipping it saves;
* ``forward(x, t, y=None, keep=None)``: ``keep`` is the set of layer ids that
  run. A skipped ResBlock becomes its skip connection (identity, or its 1x1
  projection where channels change; an up/down ResBlock keeps its resampling),
  a skipped attention block becomes identity, and the long skip connections,
  the stem and the output head always run;
* the timestep path split in two (``embed`` and ``block_projections``) so an
  exporter can fold it into constants for a fixed timestep.

``use_checkpoint`` (gradient checkpointing) and ``use_fp16`` are accepted for
compatibility and do not change inference: this module computes in float32;
reduced precision is a backend choice.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import kernel_hook
from .adapter import Layer, SkippableUNet


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, as ADM.

    CUDA input may go to a Triton kernel from ``kernels`` (CPU: always torch).
    """
    # Tracers (fx proxies, torch.compile/export) must see plain torch ops, not this lookup.
    if (
        isinstance(t, torch.Tensor)
        and t.is_cuda
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and (fast := kernel_hook("fast_timestep_embedding"))
    ):
        impl = fast(t, dim, max_period)  # None: the kernel does not cover this call
        if impl is not None:
            return impl(t, dim, max_period)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def _conv_macs(conv: nn.Conv1d | nn.Conv2d, out_numel_spatial: int) -> int:
    k = math.prod(conv.kernel_size)
    return out_numel_spatial * conv.in_channels * conv.out_channels * k // conv.groups


class _Resample(nn.Module):
    """What Upsample and Downsample share: guided-diffusion's channel attributes (each subclass adds its op)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv


class Upsample(_Resample):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x

    def macs(self, hw: tuple[int, int]) -> int:
        return _conv_macs(self.conv, 4 * hw[0] * hw[1]) if self.use_conv else 0

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return (2 * hw[0], 2 * hw[1])


class Downsample(_Resample):
    """2x downsampling: a stride-2 3x3 conv, or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def macs(self, hw: tuple[int, int]) -> int:
        o = self.out_hw(hw)
        return _conv_macs(self.op, o[0] * o[1]) if self.use_conv else 0

    def out_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        # A stride-2, padding-1 3x3 conv rounds up; 2x2 pooling rounds down.
        if self.use_conv:
            return ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
        return (hw[0] // 2, hw[1] // 2)


class ResBlock(nn.Module):
    """ADM residual block, optionally resampling (``up``/``down``)."""

    layer_id: str = ""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.up, self.down = up, down
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """This block's projection of the embedding, shaped to broadcast over NCHW."""
        return self.emb_layers(emb)[..., None, None]

    @property
    def projection_width(self) -> int:
        return self.emb_layers[1].out_features

    def forward(self, x: torch.Tensor, emb_out: Optional[torch.Tensor], skip: bool = False) -> torch.Tensor:
        """``emb_out`` is ``self.project(emb)``; ``skip=True`` runs only the skip path."""
        x_res = self.x_upd(x)
        if skip:
            return self.skip_connection(x_res)
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
        else:
            h = self.in_layers(x)
        emb_out = emb_out.type(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x_res) + h

    def _hw_out(self, hw: tuple[int, int]) -> tuple[int, int]:
        return self.x_upd.out_hw(hw) if self.updown else hw

    def skip_macs(self, hw: tuple[int, int]) -> int:
        """MACs per sample of the skip path alone (what still runs when skipped)."""
        if isinstance(self.skip_connection, nn.Conv2d):
            o = self._hw_out(hw)
            return _conv_macs(self.skip_connection, o[0] * o[1])
        return 0

    def macs(self, hw: tuple[int, int]) -> int:
        o = self._hw_out(hw)
        n = o[0] * o[1]
        emb = self.emb_layers[1]
        return (
            _conv_macs(self.in_layers[-1], n)
            + emb.in_features * emb.out_features
            + _conv_macs(self.out_layers[-1], n)
            + self.skip_macs(hw)
        )


class QKVAttentionLegacy(nn.Module):
    """Attention over a packed qkv tensor, heads split after q/k/v (ADM's original order)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = self._split(qkv, bs * self.n_heads, ch, length)
        return _attend(q, k, v, ch).reshape(bs, -1, length)

    def _split(self, qkv: torch.Tensor, heads: int, ch: int, length: int):
        return qkv.reshape(heads, ch * 3, length).split(ch, dim=1)


class QKVAttention(QKVAttentionLegacy):
    """Attention over a packed qkv tensor, q/k/v split before the heads (``use_new_attention_order``)."""

    def _split(self, qkv: torch.Tensor, heads: int, ch: int, length: int):
        return tuple(a.reshape(heads, ch, length) for a in qkv.chunk(3, dim=1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) applied to v, for (batch*heads, ch, length) tensors.

    ADM's einsum-softmax-einsum, computed by PyTorch's fused attention: the same
    function (ADM's split scaling only guards fp16 ranges), without materialising
    the (length x length) weights for the backward pass, which made attention over
    half of a CPU training step.
    """
    # 4-D (1, batch*heads, length, ch), the layout PyTorch's fused CPU kernel takes.
    # Contiguous channels: the fused kernels need stride 1 in the last dimension.
    q, k, v = (a.transpose(1, 2).contiguous().unsqueeze(0) for a in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v)[0].transpose(1, 2)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection."""

    layer_id: str = ""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb_out: Optional[torch.Tensor] = None, skip: bool = False) -> torch.Tensor:
        if skip:
            return x
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)

    def skip_macs(self, hw: tuple[int, int]) -> int:
        return 0

    def macs(self, hw: tuple[int, int]) -> int:
        n = hw[0] * hw[1]
        c = self.channels
        # qkv and output projections, then q.k and weights.v over n positions.
        return 4 * c * c * n + 2 * c * n * n


class TimestepEmbedSequential(nn.Sequential):
    """A UNet stage (guided-diffusion's class and state_dict layout): its modules run in order.

    Each ResBlock reads its own projection of the embedding (``projections[layer_id]``);
    a ResBlock or attention block not in ``keep`` runs only its skip path (``keep=None``:
    every block runs). Convolutions and resampling layers always run.
    """

    def forward(
        self, h: torch.Tensor, projections: Mapping[str, torch.Tensor], keep: Optional[frozenset[str]] = None
    ) -> torch.Tensor:
        for module in self:
            if isinstance(module, (ResBlock, AttentionBlock)):
                skip = keep is not None and module.layer_id not in keep
                h = module(h, None if skip else projections.get(module.layer_id), skip=skip)
            else:
                h = module(h)
        return h


class ADMUNet(SkippableUNet):
    """guided-diffusion's ``UNetModel`` (same arguments, same keys) with layer skipping."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if dims != 2:
            raise ValueError(f"dims={dims} is not supported: ADMUNet implements image (dims=2) models only")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        attention_resolutions = tuple(attention_resolutions)
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        res(ch, ch, down=True)
                        if resblock_updown
                        else Downsample(ch, conv_resample, dims, out_channels=ch)
                    )
                )
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, out_channels, 3, padding=1)))
        self._set_registry(*self._build_registry())

    # ----------------------------------------------------------------- registry
    def _stages(self):
        """(name, stage) for every stage in execution order."""
        for i, block in enumerate(self.input_blocks):
            yield f"input_blocks.{i}", block
        yield "middle_block", self.middle_block
        for i, block in enumerate(self.output_blocks):
            yield f"output_blocks.{i}", block

    def _build_registry(self) -> tuple[tuple[Layer, ...], int]:
        layers: list[Layer] = []
        hw = (self.image_size, self.image_size)
        fixed = 0  # MACs that run whatever is skipped
        emb = self.time_embed
        fixed += emb[0].in_features * emb[0].out_features + emb[2].in_features * emb[2].out_features
        for name, stage in self._stages():
            for j, module in enumerate(stage):
                if isinstance(module, (ResBlock, AttentionBlock)):
                    module.layer_id = f"{name}.{j}"
                    kind = "res" if isinstance(module, ResBlock) else "attn"
                    out_ch = module.out_channels if kind == "res" else module.channels
                    skip = module.skip_macs(hw)
                    layers.append(Layer(module.layer_id, kind, hw[0], out_ch, module.macs(hw) - skip))
                    fixed += skip
                    if isinstance(module, ResBlock):
                        hw = module._hw_out(hw)
                elif isinstance(module, nn.Conv2d):  # the stem
                    fixed += _conv_macs(module, hw[0] * hw[1])
                else:  # Upsample / Downsample
                    fixed += module.macs(hw)
                    hw = module.out_hw(hw)
        fixed += _conv_macs(self.out[-1], hw[0] * hw[1])
        return tuple(layers), fixed

    # ------------------------------------------------------------------ forward
    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep embedding (without labels)."""
        return self.time_embed(timestep_embedding(t, self.model_channels))

    def projected_blocks(self, keep: Optional[frozenset[str]] = None) -> list[ResBlock]:
        """The running ResBlocks (the blocks that read the embedding), in module order."""
        return [
            m
            for _, stage in self._stages()
            for m in stage
            if isinstance(m, ResBlock) and (keep is None or m.layer_id in keep)
        ]

    def forward_projected(
        self, x: torch.Tensor, projections: Mapping[str, torch.Tensor], keep: Optional[frozenset[str]] = None
    ) -> torch.Tensor:
        """The UNet body given the ResBlocks' embedding projections (see ``block_projections``).

        The long skip connections: each input stage's output is concatenated to the
        input of its mirror output stage, whatever is skipped inside the stages.
        """
        hs = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, projections, keep)
            hs.append(h)
        h = self.middle_block(h, projections, keep)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, hs.pop()], dim=1), projections, keep)
        return self.out(h)
