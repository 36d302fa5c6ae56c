"""Encoders and decoders of section 4 and appendix E.

Every encoder maps x to 2*I*D numbers (means and log variances of q(z|x)); every
decoder maps z to the parameters of p(x|z) and knows its own log-likelihood.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# 28x28 (section 4.1): 8 conv layers, kernel 3, channels 32 x3 then 64 x5.
# Strides alternate 1, 2 but the last layer keeps stride 1, so the map ends at
# 64 x 4 x 4 = 1024 features; with the mirrored decoder this gives 567,745
# parameters at I*D = 64, within 30 of the paper's 567,775 (its exact decoder is
# not published).
CONV28_CHANNELS = (32, 32, 32, 64, 64, 64, 64, 64)
CONV28_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1)
# 64x64x3 (section 4.2): 4 conv layers, kernel 3, stride 2.
CONV64_CHANNELS = (128, 256, 512, 1024)


def _conv_stack(in_ch: int, channels, strides) -> nn.Sequential:
    layers = []
    for out_ch, stride in zip(channels, strides):
        layers += [nn.Conv2d(in_ch, out_ch, 3, stride, padding=1), nn.ReLU()]
        in_ch = out_ch
    return nn.Sequential(*layers)


def _conv_sizes(size: int, strides) -> tuple[list[int], int]:
    """Input size of each kernel-3, padding-1 conv layer, and the final output size."""
    inputs = []
    for stride in strides:
        inputs.append(size)
        size = (size - 1) // stride + 1
    return inputs, size


def _deconv_stack(out_ch: int, channels, strides, image_size: int) -> nn.Sequential:
    """The transpose of _conv_stack(out_ch, channels, strides) on image_size images."""
    inputs, size = _conv_sizes(image_size, strides)
    in_channels = (out_ch,) + tuple(channels[:-1])
    layers = []
    for j in reversed(range(len(strides))):
        out_pad = inputs[j] - ((size - 1) * strides[j] + 1)  # restores the encoder's input size
        layers += [nn.ConvTranspose2d(channels[j], in_channels[j], 3, strides[j], 1, out_pad), nn.ReLU()]
        size = inputs[j]
    return nn.Sequential(*layers[:-1])  # no ReLU on the likelihood's parameters


CONV28_FINAL = _conv_sizes(28, CONV28_STRIDES)[1]  # 4
CONV64_FINAL = _conv_sizes(64, (2,) * len(CONV64_CHANNELS))[1]  # 4


class BernoulliDecoder(nn.Module):
    """z -> logits of independent Bernoulli pixels, through the transposed conv28 stack."""

    def __init__(self, latent: int):
        super().__init__()
        c = CONV28_CHANNELS[-1]
        self.body = nn.Sequential(
            nn.Linear(latent, c * CONV28_FINAL ** 2), nn.ReLU(),
            nn.Unflatten(1, (c, CONV28_FINAL, CONV28_FINAL)),
            _deconv_stack(1, CONV28_CHANNELS, CONV28_STRIDES, 28),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        logits = self(z)
        return -nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)

    def mean(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self(z))


class GaussianDecoder(nn.Module):
    """z -> per-pixel, per-colour mean and std of p(x|z) (6 output channels); std in [0.001, 0.4].
    The transposed conv64 stack at the encoder's `channels` (the paper's 128-256-512-1024 by default)."""
    STD_MIN, STD_MAX = 0.001, 0.4

    def __init__(self, latent: int, channels=CONV64_CHANNELS):
        super().__init__()
        c, strides = channels[-1], (2,) * len(channels)
        final = _conv_sizes(64, strides)[1]
        self.body = nn.Sequential(
            nn.Linear(latent, c * final ** 2), nn.ReLU(),
            nn.Unflatten(1, (c, final, final)),
            _deconv_stack(6, channels, strides, 64),
        )

    def forward(self, z: Tensor):
        mean, raw_std = self.body(z).chunk(2, dim=1)
        return mean, self.STD_MIN + (self.STD_MAX - self.STD_MIN) * torch.sigmoid(raw_std)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        mean, std = self(z)
        return (-0.5 * ((x - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(-1)

    def mean(self, z: Tensor) -> Tensor:
        return self(z)[0]


class MLPDecoder(nn.Module):
    """z -> mean of a Gaussian with a learned per-dimension std, for vector data."""

    def __init__(self, latent: int, x_dim: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, x_dim))
        self.log_std = nn.Parameter(torch.zeros(x_dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        return (-0.5 * ((x - self(z)) / self.log_std.exp()) ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def mean(self, z: Tensor) -> Tensor:
        return self(z)


def make_networks(arch: str, latent: int, x_shape, channels=()) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) for arch in {'conv28', 'conv64', 'mlp'}; encoder emits 2*latent numbers.
    `channels` (model.channels) sets conv64's widths, one stride-2 layer each; empty: the paper's."""
    if channels and arch != "conv64":
        raise ValueError(f"model.channels: only the conv64 architecture takes channel widths, not {arch}")
    if arch == "conv28":
        enc = nn.Sequential(_conv_stack(1, CONV28_CHANNELS, CONV28_STRIDES), nn.Flatten(),
                            nn.Linear(CONV28_CHANNELS[-1] * CONV28_FINAL ** 2, 2 * latent))
        return enc, BernoulliDecoder(latent)
    if arch == "conv64":
        channels = tuple(channels) or CONV64_CHANNELS
        strides = (2,) * len(channels)
        enc = nn.Sequential(_conv_stack(3, channels, strides), nn.Flatten(),
                            nn.Linear(channels[-1] * _conv_sizes(64, strides)[1] ** 2, 2 * latent))
        return enc, GaussianDecoder(latent, channels)
    if arch == "mlp":
        x_dim = int(torch.tensor(x_shape).prod())
        enc = nn.Sequential(nn.Flatten(), nn.Linear(x_dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                            nn.Linear(128, 2 * latent))
        return enc, MLPDecoder(latent, x_dim)
    raise ValueError(f"unknown architecture {arch!r}; choose conv28, conv64 or mlp")


def latent_layers(encoder: nn.Module, decoder: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two linear maps that touch z: the encoder's output layer and the decoder's input layer."""
    head, first = encoder[-1], decoder.body[0]
    if not (isinstance(head, nn.Linear) and isinstance(first, nn.Linear)):
        raise TypeError("latent_layers: the encoder must end, and the decoder begin, with nn.Linear")
    return head, first


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
