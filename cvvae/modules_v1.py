"""CV-VAE v1 encoder and decoder with the official ldm-style module tree (spec sections 2-4).

Keys: ``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``,
``decoder.up.{i}.block.{j}`` (``up.{n-1}`` is the lowest resolution and runs first), ``norm_out``, ``conv_out``.
GroupNorm eps is 1e-5; the encoder's 3D convs are causal with zero spatial padding, the decoder's are symmetric
zero-padded ``nn.Conv3d``.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import (Downsample3D, ResnetBlock3D, SpatialAttentionV1, Upsample3D, conv3d, ldm_decoder_forward,
                     ldm_encoder_forward)
from .config import ModelConfig

V1_EPS = 1e-5


def _resnet(cfg: ModelConfig, cin: int, cout: int, *, causal: bool) -> ResnetBlock3D:
    return ResnetBlock3D(cin, cout, causal=causal, pad_mode="zeros", eps=V1_EPS, groups=cfg.norm_num_groups,
                         shortcut_name="nin_shortcut")


class _Mid(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int, *, causal: bool, temporal_attention: bool) -> None:
        super().__init__()
        self.block_1 = _resnet(cfg, channels, channels, causal=causal)
        self.attn_1 = SpatialAttentionV1(channels, eps=V1_EPS, groups=cfg.norm_num_groups,
                                         temporal=temporal_attention)
        self.block_2 = _resnet(cfg, channels, channels, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderV1(nn.Module):
    """Pixels (B,3,T,H,W) -> moments (B,2z,1+(T-1)//4,H/8,W/8)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.widths
        self.conv_in = conv3d(cfg.in_channels, widths[0], 3, causal=True, pad_mode="zeros")
        self.down = nn.ModuleList()
        cin = widths[0]
        for i, cout in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.layers_per_block):
                level.block.append(_resnet(cfg, cin, cout, causal=True))
                cin = cout
            level.attn = nn.ModuleList()
            if i != cfg.num_levels - 1:
                level.downsample = Downsample3D(cin, down_time=i in cfg.time_down_levels, variant="v1")
            self.down.append(level)
        self.mid = _Mid(cfg, cin, causal=True, temporal_attention=False)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=V1_EPS)
        self.conv_out = conv3d(cin, 2 * cfg.latent_channels, 3, causal=True, pad_mode="zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ldm_encoder_forward(self, x)


class DecoderV1(nn.Module):
    """Latents (B,z,L,h,w) -> pixels (B,3,4(L-1)+1,8h,8w)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = cfg.widths
        cin = widths[-1]
        self.conv_in = conv3d(cfg.latent_channels, cin, 3, causal=False, pad_mode="zeros")
        self.mid = _Mid(cfg, cin, causal=False, temporal_attention=True)
        levels: list[nn.Module] = []
        for i in reversed(range(cfg.num_levels)):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.layers_per_block + 1):
                level.block.append(_resnet(cfg, cin, widths[i], causal=False))
                cin = widths[i]
            level.attn = nn.ModuleList()
            if i != 0:
                level.upsample = Upsample3D(cin, up_time=i % 2 == 1, variant="v1")
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=V1_EPS)
        self.conv_out = conv3d(cin, cfg.out_channels, 3, causal=False, pad_mode="zeros")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ldm_decoder_forward(self, z)
