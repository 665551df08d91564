"""CV-VAE SD3-variant encoder and decoder with the official diffusers-style module tree (spec section 7).

Keys: ``encoder.down_blocks.{i}.resnets.{j}``, ``encoder.down_blocks.{i}.downsamplers.0.conv``,
``{encoder,decoder}.mid_block.{resnets.{0,1},attentions.0}``, ``decoder.up_blocks.{i}`` (run in index order, lowest
resolution first), ``conv_norm_out``, ``conv_out``. GroupNorm eps 1e-6; every 3D conv replicate-pads; shortcuts are
per-frame 1x1 ``conv_shortcut``; attention is spatial only.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Downsample3D, ResnetBlock3D, SpatialAttentionSD3, Upsample3D, conv3d, conv_frames, norm_silu_conv
from .config import ModelConfig

SD3_EPS = 1e-6


def _resnet(cfg: ModelConfig, cin: int, cout: int, *, causal: bool) -> ResnetBlock3D:
    return ResnetBlock3D(cin, cout, causal=causal, pad_mode="replicate", eps=SD3_EPS, groups=cfg.norm_num_groups,
                         shortcut_name="conv_shortcut")


class MidBlock3D(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int, *, causal: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(cfg, channels, channels, causal=causal) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialAttentionSD3(channels, eps=SD3_EPS, groups=cfg.norm_num_groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Block(nn.Module):
    """A DownEncoderBlock3D / UpDecoderBlock3D: resnets, then an optional resampler."""

    def __init__(self, resnets: list[ResnetBlock3D], sampler_attr: str, sampler: nn.Module | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.sampler_attr = sampler_attr
        if sampler is not None:
            setattr(self, sampler_attr, nn.ModuleList([sampler]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        samplers = getattr(self, self.sampler_attr, None)
        return samplers[0](x) if samplers is not None else x


class EncoderSD3(nn.Module):
    """Pixels (B,3,T,H,W) -> moments (B,2z,1+(T-1)//4,ceil(H/8),ceil(W/8))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.widths
        self.conv_in = conv3d(cfg.in_channels, widths[0], 3, causal=True, pad_mode="replicate")
        blocks = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            resnets = [_resnet(cfg, cin if j == 0 else cout, cout, causal=True) for j in range(cfg.layers_per_block)]
            cin = cout
            down = None
            if i != cfg.num_levels - 1:
                down = Downsample3D(cout, down_time=i in cfg.time_down_levels, variant="sd3")
            blocks.append(_Block(resnets, "downsamplers", down))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock3D(cfg, cin, causal=True)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=SD3_EPS)
        self.conv_out = conv3d(cin, 2 * cfg.latent_channels, 3, causal=True, pad_mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = conv_frames(self.conv_in, x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return norm_silu_conv(self.conv_norm_out, self.conv_out, h)


class DecoderSD3(nn.Module):
    """Latents (B,16,L,h,w) -> pixels (B,3,4(L-1)+1,8h,8w)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        reversed_widths = list(reversed(cfg.widths))
        cin = reversed_widths[0]
        self.conv_in = conv3d(cfg.latent_channels, cin, 3, causal=False, pad_mode="replicate")
        self.mid_block = MidBlock3D(cfg, cin, causal=False)
        blocks = []
        n = cfg.num_levels
        for i, cout in enumerate(reversed_widths):
            resnets = [_resnet(cfg, cin if j == 0 else cout, cout, causal=False)
                       for j in range(cfg.layers_per_block + 1)]
            cin = cout
            # Execution index i corresponds to v1 level n-1-i, which upsamples time when odd.
            up = Upsample3D(cout, up_time=(n - 1 - i) % 2 == 1, variant="sd3") if i != n - 1 else None
            blocks.append(_Block(resnets, "upsamplers", up))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=SD3_EPS)
        self.conv_out = conv3d(cin, cfg.out_channels, 3, causal=False, pad_mode="replicate")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return norm_silu_conv(self.conv_norm_out, self.conv_out, h)
