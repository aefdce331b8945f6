#!/usr/bin/env python3
"""ddpm_mnist.py: a denoising diffusion model (DDPM) on MNIST, in one file.

Read it top to bottom; it is written in the order you would learn the method:

    1. data          MNIST as one tensor in [-1, 1]
    2. forward       how images are noised: schedules and q(x_t | x_0)
    3. network       a small U-Net that predicts the noise
    4. training      the simple loss, EMA, checkpoints, resume
    5. sampling      DDPM ancestral sampling, DDIM, DPM-Solver++, guidance
    6. pictures      grids, the forward process, reverse trajectories, GIFs
    7. evaluation    FID on the features of a small MNIST classifier; speed
    8. command line  train, sample, forward, evaluate, export, bench

Run it:

    python ddpm_mnist.py train                # about 30 min on a 2-core CPU
    python ddpm_mnist.py sample --digit 7     # a grid of sevens in seconds

Papers, cited by equation number throughout:
    Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM)
    Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
    Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM)
    Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"
    Ho, Salimans 2022, "Classifier-Free Diffusion Guidance"
    Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
        Diffusion Probabilistic Models"
    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"
    Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of
        Diffusion Models" (v-prediction)
    Ronneberger et al. 2015, "U-Net"; Perez et al. 2018, "FiLM"
    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule" (FID)
"""

import argparse
import contextlib
import copy
import functools
import io
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A mistake the user can fix. The CLI prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# 0. Device and precision
#
# Everything runs on CUDA, Apple's MPS or the CPU. Matrix multiplies and
# convolutions run under bfloat16 autocast where that is faster, because it
# can be several times faster and diffusion training is robust to it: on GPUs
# with native bf16, and on CPUs with bf16 instructions (AVX512-BF16 or AMX)
# where a quick timing shows bf16 convolutions beat fp32 ones. The timing is
# needed because the instructions alone do not tell: on one 2-core CPU with
# AVX512-BF16 we saw bf16 train 1.7 times faster than fp32, on another 0.7
# times as fast. Losses, the noise schedule and the sampler's arithmetic
# always stay in fp32 or better.
# -----------------------------------------------------------------------------

def pick_device(name):
    # "auto" tries the fastest first. Naming a device that is not there is a
    # user mistake, reported as such, never silently replaced by the CPU.
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here")
    return torch.device(name)


def cpu_has_native_bf16():
    # torch.cpu exposes these checks privately; if they ever move, fall back to
    # fp32, which is always correct, just slower.
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


@functools.cache
def cpu_bf16_is_faster():
    # Asked only where the CPU has bf16 instructions. Time one convolution of
    # the U-Net's middle size, forward and backward, in both precisions (about
    # 0.2 s, once per run). The two take turns and each keeps its fastest time,
    # so a moment of load from elsewhere, which only ever adds time, cannot tip
    # the choice. bf16 must win by 20%: it costs precision, and a near tie is
    # not worth it. A private generator keeps the global random state, and so
    # seeded runs, untouched.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, 3, 3, generator=g, requires_grad=True)
    x = torch.randn(32, 64, 14, 14, generator=g, requires_grad=True)
    fastest = {False: math.inf, True: math.inf}
    for rep in range(10):
        for bf16 in (False, True):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = F.conv2d(x, w, padding=1)
            y.float().sum().backward()
            if rep > 0:   # the first round warms up
                fastest[bf16] = min(fastest[bf16], time.perf_counter() - start)
    return fastest[False] > 1.2 * fastest[True]


def has_native_bf16(device):
    if device.type == "cuda":
        # bf16 tensor cores arrived with Ampere (compute capability 8.0);
        # is_bf16_supported() would also say yes to the emulation on older GPUs
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False  # MPS: bf16 autocast depends on the macOS version; fp32 is safe


def pick_precision(name, device):
    if name != "auto":
        return name
    if not has_native_bf16(device):
        return "fp32"
    # a GPU's bf16 units are always the faster; a CPU's instructions may not be
    return "bf16" if device.type != "cpu" or cpu_bf16_is_faster() else "fp32"


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# 1. Data
#
# MNIST: 60,000 training images of handwritten digits, 28x28, grayscale, with
# labels 0-9. A diffusion model adds Gaussian noise of unit variance, so the
# images must live on a comparable scale, centred on zero: we map pixels from
# [0, 255] to [-1, 1] (Ho et al. 2020, section 3.3),
#
#     x_0 = 2 * pixel / 255 - 1.
#
# Getting this range wrong (leaving images in [0, 1]) is the most common
# cause of washed-out samples.
#
# The whole training set is 188 MB as float32 (47 MB as the file's bytes), so
# we decode it once into one tensor and index random batches from it: no
# per-image decoding, no PIL, no DataLoader workers competing with the
# training for a laptop's few cores.
# -----------------------------------------------------------------------------

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def mnist_dataset(data_dir, train=True):
    """torchvision's MNIST under data_dir, downloading it once if it is missing."""
    from torchvision import datasets
    raw = Path(data_dir) / "MNIST" / "raw"
    missing = "MNIST is not in {} and could not be downloaded: put the four files {} there".format(
        raw, ", ".join(MNIST_FILES))
    try:
        return datasets.MNIST(data_dir, train=train, download=False)
    except RuntimeError as e:
        if "not found" not in str(e):  # files present but unreadable
            raise UserError(f"the MNIST files in {raw} are unreadable ({e}); replace them") from None
    except Exception as e:
        raise UserError(f"the MNIST files in {raw} are unreadable ({e}); replace them") from None
    try:  # torchvision prints a line per mirror it tries; we keep only the outcome
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return datasets.MNIST(data_dir, train=train, download=True)
    except Exception:
        raise UserError(missing) from None


def load_mnist(data_dir, train=True, digit=None, limit=None, image_size=28):
    """Images as float32 [N, 1, S, S] in [-1, 1], and labels as int64 [N]."""
    ds = mnist_dataset(data_dir, train)
    x, y = ds.data, ds.targets                 # uint8 [N, 28, 28], int64 [N]
    if digit is not None:
        keep = y == digit
        x, y = x[keep], y[keep]
    if limit is not None:
        x, y = x[:limit], y[:limit]            # "the first N" after the digit filter
    if len(x) == 0:
        raise UserError("no training images are left after --digit/--limit")
    x = x.unsqueeze(1).float() / 255           # what ToTensor() does: [0, 1]
    if image_size != 28:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    return x * 2 - 1, y                        # normalise to [-1, 1]


# -----------------------------------------------------------------------------
# 2. The forward process and noise schedules
#
# The forward process slowly destroys an image x_0 with Gaussian noise over T
# steps, each step keeping sqrt(1 - beta_t) of the signal (Ho et al. eq. 2):
#
#     q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I)
#
# Because Gaussians compose, we can jump to any step directly (Ho et al. eq. 4),
# with alpha_t = 1 - beta_t and alpha_bar_t = prod_{s <= t} alpha_s:
#
#     q(x_t | x_0) = N(x_t; sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
#     x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I)
#
# alpha_bar_t is the share of signal variance left at step t: it falls from
# about 1 at t = 0 to about 0 at t = T - 1. How fast it falls is the schedule:
#
#   linear: beta_t from 1e-4 to 0.02 (Ho et al. section 4). On small images it
#           wipes the signal out early: the last third of the steps see almost
#           pure noise and teach the model little.
#   cosine: alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2)
#           with s = 0.008 (Nichol & Dhariwal 2021, eq. 17), betas clipped at
#           0.999. alpha_bar falls slowly at both ends, linearly in between.
#
# Timesteps are 0-based everywhere in this file: t in {0, ..., T-1}, where
# t = 0 is the first noising step (a little noise, beta_0) and t = T - 1 the
# last. Training draws t from exactly that range and sampling walks it back
# from T - 1 to 0; mixing 0- and 1-based conventions is a classic bug. So
# the file's x_t is the paper's x_{t+1}, and the clean image x_0 sits at
# "t = -1", where alpha_bar_{-1} = 1 (no noise at all).
# -----------------------------------------------------------------------------

def linear_betas(T):
    # Scaled by 1000/T so that any T gives the same overall amount of noise as
    # Ho et al.'s T = 1000 (as Nichol & Dhariwal do); exactly 1e-4..0.02 at 1000.
    scale = 1000 / T
    return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(T, s=0.008):
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_bar = f / f[0]
    return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)


class Schedule(NamedTuple):
    """Every per-timestep constant the equations use, indexed by t = 0..T-1."""
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_bar: torch.Tensor
    alphas_bar_prev: torch.Tensor      # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    posterior_variance: torch.Tensor   # beta~_t, Ho et al. eq. 7
    posterior_coef_x0: torch.Tensor    # the two weights of mu~_t, Ho et al. eq. 7
    posterior_coef_xt: torch.Tensor

    @property
    def T(self):
        return len(self.betas)


def make_schedule(name, T):
    if name == "linear":
        betas = linear_betas(T)
    elif name == "cosine":
        betas = cosine_betas(T)
    else:
        raise UserError(f"unknown schedule {name!r}: use cosine or linear")
    # Everything below is a fixed function of the betas. Computing it once here
    # keeps the training and sampling code a direct transcription of the
    # equations, with names from the papers.
    alphas = 1 - betas
    alphas_bar = torch.cumprod(alphas, dim=0)
    alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
    sched = Schedule(
        betas=betas,
        alphas=alphas,
        alphas_bar=alphas_bar,
        alphas_bar_prev=alphas_bar_prev,
        posterior_variance=betas * (1 - alphas_bar_prev) / (1 - alphas_bar),
        posterior_coef_x0=betas * alphas_bar_prev.sqrt() / (1 - alphas_bar),
        posterior_coef_xt=(1 - alphas_bar_prev) * alphas.sqrt() / (1 - alphas_bar),
    )
    # Computed in float64 for accuracy (alpha_bar gets tiny), stored as float32.
    return Schedule(*(v.float() for v in sched))


def at(values, t):
    """values[t] for a batch of timesteps, shaped [B, 1, 1, 1] to broadcast over images."""
    return values.to(t.device)[t].view(-1, 1, 1, 1)


def q_sample(x0, t, eps, alphas_bar):
    """Sample x_t ~ q(x_t | x_0) (Ho et al. eq. 4), given the noise eps."""
    ab = at(alphas_bar, t)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


# -----------------------------------------------------------------------------
# 3. The network: a compact U-Net eps_theta(x_t, t, y)
#
# The model sees a noisy image x_t, the timestep t and (optionally) the digit y,
# and predicts the noise eps that was mixed in. Its output has the shape of its
# input, so we use a U-Net (Ronneberger et al. 2015, as in Ho et al. appendix B):
#
#   28x28 --down--> 14x14 --down--> 7x7 (+ self-attention) --up--> 14 --up--> 28
#
# with skip connections carrying detail from each resolution on the way down to
# the same resolution on the way up. Each level is one residual block
# (GroupNorm, SiLU, 3x3 conv; the class can stack more, this file uses one).
# The timestep and the label enter every block as a learned scale s and
# shift b of its normalised features,
#
#     h -> GroupNorm(h) * (1 + s(t, y)) + b(t, y)
#
# (FiLM, Perez et al. 2018; "adaptive GroupNorm" in Dhariwal & Nichol 2021).
# t reaches them through a sinusoidal embedding, like a Transformer's
# position encoding: sin(t f_k) and cos(t f_k) for k = 0 .. d/2 - 1, at
# frequencies f_k = 10000^(-2k/d) for an embedding of width d.
#
# The label y has 11 embeddings: one per digit and one meaning "no label".
# Training shows the model "no label" 20% of the time, so one network learns
# both p(x | y) and p(x); sampling combines the two (classifier-free guidance,
# Ho & Salimans 2022), see section 5.
# -----------------------------------------------------------------------------

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES   # the extra "no label" class


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps: [B] -> [B, dim]."""
    # Sines and cosines of t at frequencies from 1 down towards 1/10000 (Vaswani
    # et al. 2017): neighbouring t get similar vectors, far-apart t different
    # ones, and the MLP that follows can read both coarse and fine position.
    # A raw number t in 0..999 would be a poorly scaled input for a network.
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def zero_init(module):
    # The last layer of each residual branch starts at zero, so every block
    # starts as its skip path (the identity where the width does not change)
    # and the untrained U-Net outputs 0: stable from step one (Ho et al.'s
    # code does the same).
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """skip(x) + conv(silu(norm(conv(silu(norm(x)))) * (1 + scale(t, y)) + shift(t, y))),
    skip being the identity, or a 1x1 conv where the width changes."""

    def __init__(self, c_in, c_out, emb_dim, groups=8):
        super().__init__()
        # GroupNorm, not BatchNorm: it normalises each image on its own, so a
        # sample does not depend on what else is in its batch, and training
        # batches of 32 and sampling batches of any size behave alike.
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        # The conditioning scales and shifts each channel right after a
        # normalisation, so it sets each feature's size and offset directly
        # (adaptive GroupNorm, which Dhariwal & Nichol found better than
        # adding it); "1 + scale" makes a zero output mean "leave alone".
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a small feature map, residual.

    Its cost grows with the square of the number of pixels: 49 at 7x7, where
    we use it, against 784 at 28x28, 256 times as many pairs. Convolutions
    mix features by position, the same weights everywhere; attention mixes
    them by content, any pixel with any other, in a single layer."""

    def __init__(self, channels, heads=4, groups=8):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)          # each [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv: a learned pooling."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), then a 3x3 conv that also
    narrows the channels to the next level's width.

    Resizing then convolving, rather than a transposed convolution, avoids
    the checkerboard pattern the latter tends to print (Odena et al. 2016)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t, y): [B, 1, H, W], [B], [B] -> [B, 1, H, W]."""

    def __init__(self, channels=(32, 64, 128), blocks=1):
        super().__init__()
        # Each level halves the resolution and widens the features, as in Ho
        # et al.: coarser maps need more channels to describe what is where.
        c0, levels = channels[0], len(channels)
        emb_dim = 4 * c0       # the conditioning vector's width, 4x the first level's, as in Ho et al.
        self.c0 = c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        self.stem = nn.Conv2d(1, c0, 3, padding=1)

        # Down: at each level `blocks` residual blocks, whose output is kept as
        # that level's skip connection, then halve the resolution.
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c = c0
        for level, ch in enumerate(channels):
            self.down.append(nn.ModuleList([ResBlock(c if i == 0 else ch, ch, emb_dim) for i in range(blocks)]))
            c = ch
            if level < levels - 1:
                self.downsample.append(Downsample(c))

        # Middle, at the lowest resolution (7x7 for 28x28 inputs): every pixel
        # attends to every other, so the model can relate far-apart strokes.
        self.mid1 = ResBlock(c, c, emb_dim)
        self.mid_attn = SelfAttention(c)
        self.mid2 = ResBlock(c, c, emb_dim)

        # Up: the mirror image; each level first concatenates its skip.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(levels)):
            ch = channels[level]
            self.up.append(nn.ModuleList([ResBlock(2 * ch if i == 0 else ch, ch, emb_dim) for i in range(blocks)]))
            if level > 0:
                self.upsample.append(Upsample(ch, channels[level - 1]))

        # The output layer starts at zero: the untrained model predicts eps = 0,
        # the mean of the noise, so training starts from that sensible guess
        # rather than from a random network's arbitrary output.
        self.out_norm = nn.GroupNorm(8, c0)
        self.out_conv = zero_init(nn.Conv2d(c0, 1, 3, padding=1))

    def forward(self, x_t, t, y):
        # One conditioning vector per image: "when" (t) plus "what" (y). Every
        # residual block turns it into its own per-channel scale and shift.
        emb = self.time_mlp(timestep_embedding(t, self.c0)) + self.label_emb(y)
        h = self.stem(x_t)
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.out_conv(F.silu(self.out_norm(h)))


def check_model_config(cfg):
    """Reject shapes the U-Net cannot take, with the reason."""
    channels, size = cfg["channels"], cfg["image_size"]
    if not channels or any(c <= 0 or c % 8 for c in channels):
        raise UserError(f"--channels {','.join(map(str, channels))}: every width must be a positive multiple of 8 (GroupNorm uses 8 groups)")
    if channels[-1] % 4:
        raise UserError("--channels: the last width must be divisible by 4 attention heads")
    if size < 8 or size % 2 ** (len(channels) - 1):
        raise UserError(f"--image-size {size} must be at least 8 and divisible by {2 ** (len(channels) - 1)} "
                        f"to halve it {len(channels) - 1} times")
    if cfg["timesteps"] < 2:
        raise UserError("--timesteps must be at least 2")


def build_model(cfg):
    check_model_config(cfg)
    return UNet(tuple(cfg["channels"]), cfg["blocks"])   # any image size: convolutions and attention do not care


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# 4. The loss and training
#
# Ho et al. show (eq. 8-12) that learning the reverse process reduces, up to
# weights, to predicting the noise: draw x_0 from the data, t uniformly from
# {0..T-1} and eps ~ N(0, I), form x_t by eq. 4, and regress (eq. 14, L_simple)
#
#     L_simple = E || eps - eps_theta(x_t, t, y) ||^2
#
# That is Algorithm 1 of the paper, and all of training. Around it:
#   - each image's squared error is weighted by min(SNR_t, 5) / SNR_t, where
#     SNR_t = alpha_bar_t / (1 - alpha_bar_t) is the signal-to-noise ratio of
#     x_t (Min-SNR-5, Hang et al. 2023). Why: measured on the clean image
#     x0_hat that eps_hat implies (x0_hat = (x_t - sqrt(1 - alpha_bar_t)
#     eps_hat) / sqrt(alpha_bar_t), Ho et al. eq. 15, used again in section 5),
#     ||eps - eps_hat||^2 = SNR_t ||x_0 - x0_hat||^2, so L_simple weights step t
#     by SNR_t, and the nearly clean steps, where only invisible detail is
#     left to fix, dominate the gradient. The weight caps that at 5. In our
#     runs it halved the FID after one epoch (README, "The training recipe");
#   - small batches of 32: in a 30-minute budget, optimisation steps are what
#     is scarce. Batch 32 makes four times the steps of batch 128 in the same
#     time (on a CPU the images/s barely change) and beat it by far;
#   - labels are replaced by "no label" with probability 0.2 (Ho & Salimans
#     2022, Algorithm 1) so the same network also learns p(x). The paper
#     found 0.1 and 0.2 both good; 0.1 left our unconditional samples far
#     worse than the conditional ones; 0.2 cut their FID by a third and
#     improved the guided samples too;
#     0.3 helped the unconditional samples again but dropped the guided ones
#     under 99% right (README, "The training recipe");
#   - the network predicts eps, as in the paper. Predicting the equivalent
#     v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 instead (Salimans
#     & Ho 2022) gave a much better unguided model but guided samples only
#     a little better at the same 99% accuracy (README, "The training
#     recipe"): not enough to add a second parametrisation to learn;
#   - AdamW, a short linear warm-up then cosine decay of the learning rate, and
#     gradient clipping at norm 1: the usual recipe for a stable short run;
#   - an exponential moving average (EMA) of the weights is what we sample with.
#     While the learning rate is high, the raw weights jitter with every
#     minibatch; the average smooths that out. Its decay ramps up as
#     (1 + n) / (10 + n), so the EMA is useful after a short run too rather
#     than stuck at the init; that ramp stays under the cap of 0.999 until
#     step 8990, so in a default run the EMA spans about the last tenth of
#     the steps so far. By the end the cosine decay has brought the rate to
#     zero, and the raw weights scored as well as the EMA (README, "The
#     training recipe"): with this schedule the EMA is a safeguard, not a gain.
#   - after every epoch the whole training state is saved atomically, so a run
#     can be killed and resumed exactly where the last epoch ended.
# -----------------------------------------------------------------------------

P_UNCOND = 0.2
MIN_SNR_GAMMA = 5.0
TRAIN_IMAGES = 300_000       # the default length of a run, in images seen
EMA_DECAY = 0.999
WARMUP_FRACTION = 0.05


def diffusion_loss(model, x0, y, sched, gen, device):
    """L_simple on one batch (Ho et al. Algorithm 1), Min-SNR weighted. Random
    draws come from `gen`."""
    B = x0.shape[0]
    t = torch.randint(0, sched.T, (B,), generator=gen)            # t in {0, ..., T-1}
    eps = torch.randn(x0.shape, generator=gen)
    # Label dropout: a random 20% of the batch is shown "no label", which
    # trains the unconditional model p(x) in the same network and the same
    # step as the conditional p(x | y); guidance needs both (section 5).
    drop = torch.rand(B, generator=gen) < P_UNCOND
    t, eps, drop = t.to(device), eps.to(device), drop.to(device)
    y = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
    x_t = q_sample(x0, t, eps, sched.alphas_bar)
    error = (model(x_t, t, y).float() - eps).square().mean(dim=(1, 2, 3))   # one per image
    return (min_snr_weights(sched.alphas_bar, t) * error).mean()


def min_snr_weights(alphas_bar, t, gamma=MIN_SNR_GAMMA):
    """min(SNR_t, gamma) / SNR_t, written as gamma / max(SNR_t, gamma) so that
    alpha_bar_t = 0 (pure noise) gives 1 rather than 0 / 0."""
    ab = at(alphas_bar, t).view(-1)
    return gamma / torch.clamp(ab / (1 - ab), min=gamma)


@torch.no_grad()
def ema_update(ema, model, step):
    # The decay ramps up from 0.1: early on the average follows the weights
    # closely, instead of being anchored for thousands of steps to the random
    # initial weights it started from.
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def lr_lambda(total_steps):
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    # Warm-up: in the first steps Adam's running estimates of the gradient
    # scale rest on a handful of batches, so full-size steps would be erratic.
    # Decay to zero: the last steps refine rather than jump around.
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; raised before any weight changed."""


def train_step(model, ema, opt, lr_sched, x0, y, sched, gen, device, precision, step):
    """One optimisation step on one batch; returns the loss.

    A non-finite loss raises NonFiniteLoss before anything is updated: a NaN
    would silently poison the weights and then the EMA, so training stops at
    once, before the next checkpoint overwrites a good one."""
    with autocast(device, precision):   # bf16 matmuls and convs; the loss itself is fp32
        loss = diffusion_loss(model, x0, y, sched, gen, device)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss became {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # Clipping the gradient norm keeps one unlucky batch (early in training,
    # or full of hard timesteps) from undoing earlier progress.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    lr_sched.step()
    ema_update(ema, model, step)
    return loss.detach()


def atomic_save(obj, path):
    """Write to a temporary file, then rename over the old one: an interrupted
    save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Read a checkpoint as plain data (weights_only: a file can never run code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one with 'python ddpm_mnist.py train' or pass --ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable (truncated or corrupt?): {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ddpm_mnist" or "config" not in ckpt or "ema" not in ckpt:
        raise UserError(f"{path} is not a ddpm_mnist checkpoint")
    return ckpt


def model_from_checkpoint(ckpt, path, weights="ema"):
    """Rebuild the U-Net from the checkpoint's own config and load its weights."""
    cfg = ckpt["config"]
    try:
        model = build_model(cfg)
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: its config is incomplete ({e})") from None
    try:
        model.load_state_dict({k: v.float() for k, v in ckpt[weights].items()})
    except (RuntimeError, KeyError, AttributeError):
        raise UserError(f"{path}: its weights do not fit the model its config describes "
                        f"(channels {cfg['channels']}, blocks {cfg['blocks']}); the file is damaged or from another model") from None
    # A NaN weight would give NaN images, and `evaluate` a linear-algebra
    # traceback from the FID; say what is wrong instead.
    if not all(torch.isfinite(p).all() for p in model.state_dict().values()):
        raise UserError(f"{path}: some of its weights are NaN or infinite; the file is damaged")
    return model


RUN_FLAGS = ("channels", "image_size", "schedule", "timesteps", "epochs", "batch_size", "lr", "seed", "digit", "limit")


def check_resume_flags(args, cfg, ckpt_path):
    # A flag given together with --resume that contradicts the checkpoint's
    # config would otherwise be ignored without a word: say so and stop.
    defaults = vars(build_parser().parse_args(["train"]))
    clashes = [f"--{k.replace('_', '-')} {getattr(args, k)} (it has {cfg[k]})" for k in RUN_FLAGS
               if getattr(args, k) != defaults[k] and getattr(args, k) != cfg[k]]
    if clashes:
        raise UserError(f"--resume continues {ckpt_path} with its own config, but you also gave "
                        f"{', '.join(clashes)}; drop those flags, or start a new run with another --ckpt")


def train(args):
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    ckpt_path = Path(args.ckpt)

    # The config holds everything that defines the run. A resumed run takes it
    # from the checkpoint, not from the command line, so that it cannot quietly
    # become a different run (other widths, other LR schedule) halfway through.
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        if "optimizer" not in ckpt:
            raise UserError(f"{ckpt_path} holds only exported weights, not a training state to resume")
        cfg = ckpt["config"]
        check_resume_flags(args, cfg, ckpt_path)
        print(f"resuming {ckpt_path} at epoch {ckpt['epoch']}, step {ckpt['step']} (its own config: {cfg})")
    else:
        cfg = dict(channels=args.channels, blocks=1, image_size=args.image_size,
                   schedule=args.schedule, timesteps=args.timesteps,
                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   digit=args.digit, limit=args.limit)
        check_model_config(cfg)
        if (args.epochs is not None and args.epochs < 1) or args.batch_size < 1 or args.lr <= 0 \
                or (args.limit is not None and args.limit < 1):
            raise UserError("--epochs, --batch-size and --limit must be at least 1 and --lr positive")

    x_all, y_all = load_mnist(args.data_dir, True, cfg["digit"], cfg["limit"], cfg["image_size"])
    x_all, y_all = x_all.to(device), y_all.to(device)
    if cfg["epochs"] is None:
        # What a diffusion model needs is optimisation steps, not passes over
        # the data: by default every run sees TRAIN_IMAGES images, 5 epochs of
        # full MNIST or 60 of the first 5000 ones.
        cfg["epochs"] = math.ceil(TRAIN_IMAGES / len(x_all))
    sched = make_schedule(cfg["schedule"], cfg["timesteps"])

    torch.manual_seed(cfg["seed"])                       # the initial weights
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)     # starts equal to the model
    # No weight decay: the model is small and sees each image a few times only;
    # decay would just pull the weights towards zero for nothing.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    steps_per_epoch = math.ceil(len(x_all) / cfg["batch_size"])
    total_steps = cfg["epochs"] * steps_per_epoch
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps))
    # Every random draw of training (data order, t, eps, label dropout) comes
    # from this one generator. Its state is saved with each checkpoint, which
    # is what lets a resumed run continue exactly as if it had never stopped.
    gen = torch.Generator().manual_seed(cfg["seed"])
    step, start_epoch = 0, 0
    if args.resume:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        lr_sched.load_state_dict(ckpt["lr_scheduler"])
        gen.set_state(ckpt["rng"])
        step, start_epoch = ckpt["step"], ckpt["epoch"]
        if start_epoch >= cfg["epochs"]:
            print(f"{ckpt_path} already finished all {cfg['epochs']} epochs; nothing to do")
            return

    print(f"U-Net {count_params(model):,} parameters | {len(x_all):,} images | {device} {precision} | "
          f"{cfg['epochs']} epochs x {steps_per_epoch} steps of {cfg['batch_size']}")
    model.train()
    t_start, last_print, images_done = time.time(), 0.0, 0
    for epoch in range(start_epoch, cfg["epochs"]):
        perm = torch.randperm(len(x_all), generator=gen).to(device)   # a fresh shuffle per epoch
        for i in range(steps_per_epoch):
            idx = perm[i * cfg["batch_size"]:(i + 1) * cfg["batch_size"]]
            try:
                loss = train_step(model, ema, opt, lr_sched, x_all[idx], y_all[idx], sched, gen, device, precision, step)
            except NonFiniteLoss as e:
                raise UserError(f"{e}; try a lower --lr (the last good checkpoint is {ckpt_path})") from None
            step += 1
            images_done += len(idx)

            now = time.time() - t_start
            if now - last_print > 10 or i == steps_per_epoch - 1:
                last_print = now
                rate = images_done / now
                left = (total_steps - step) * cfg["batch_size"] / rate
                print(f"epoch {epoch + 1}/{cfg['epochs']}  step {step}/{total_steps}  loss {loss.item():.4f}  "
                      f"lr {lr_sched.get_last_lr()[0]:.2e}  {rate:.0f} img/s  left {format_seconds(left)}",
                      flush=True)

        # End of an epoch: save everything a resume needs, then draw a picture
        # with the EMA weights so progress can be seen, not only read off the loss.
        atomic_save(dict(format="ddpm_mnist", config=cfg, model=model.state_dict(), ema=ema.state_dict(),
                         optimizer=opt.state_dict(), lr_scheduler=lr_sched.state_dict(),
                         step=step, epoch=epoch + 1, rng=gen.get_state()), ckpt_path)
        grid_path = ckpt_path.with_name(f"{ckpt_path.stem}_epoch{epoch + 1:02d}.png")
        epoch_grid(ema, sched, cfg, device, precision, grid_path)
        print(f"saved {ckpt_path} and {grid_path}", flush=True)
    print(f"done: {step} steps in {format_seconds(time.time() - t_start)}")


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# 5. Sampling: running the process backwards
#
# DDPM (Ho et al. Algorithm 2). Start from pure noise x_{T-1} ~ N(0, I) and
# step t = T-1, ..., 0 through the learned reverse process. With the network's
# noise estimate we first estimate the clean image (Ho et al. eq. 15),
#
#     x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t),
#
# clip it to the data range [-1, 1], and then take a step to the mean of the
# true posterior q(x_{t-1} | x_t, x0_hat) (Ho et al. eq. 6-7),
#
#     mu~_t = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) x0_hat
#           + (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t) x_t,
#
# plus noise of variance beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
# except at the last step. Without the clip this is exactly the paper's line
# x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma z
# (eq. 11 and Algorithm 2; --no-clip); with it, early steps, where x0_hat is
# a wild guess, cannot push pixels out of range, which removes the speckled,
# washed-out look.
#
# DDIM (Song et al. 2021, eq. 12) uses the same trained network but a
# non-Markovian process that can skip steps: on a subsequence of S timesteps,
#
#     x_{t'} = sqrt(alpha_bar_{t'}) x0_hat
#            + sqrt(1 - alpha_bar_{t'} - sigma^2) eps_theta + sigma z,
#     sigma  = eta sqrt((1 - alpha_bar_{t'}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t'})
#
# (eq. 16), t' being the next timestep down. eta = 0 is deterministic: noise in,
# image out, no randomness on the way. With eta = 1 and all T steps it is the
# DDPM sampler above (a test checks this).
#
# DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) reads DDIM
# with eta = 0 as one step of an ordinary differential equation and takes a
# better step. In the log signal-to-noise ratio
#
#     lambda_t = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)),   h = lambda_{t'} - lambda_t,
#
# the exact solution from t to t' is a known linear part plus an integral of
# the network's clean-image estimate over lambda (sigma_t = sqrt(1 - alpha_bar_t)):
#
#     x_{t'} = sigma_{t'} / sigma_t x_t + sigma_{t'} Integral e^lambda x0_hat(lambda) dlambda,
#
# the integral running from lambda_t to lambda_{t'}.
#
# Holding x0_hat fixed over the step, the integral is x0_hat (e^{lambda_{t'}} -
# e^{lambda_t}), and since sigma_{t'} e^{lambda_{t'}} = sqrt(alpha_bar_{t'}),
#
#     x_{t'} = sqrt((1 - alpha_bar_{t'}) / (1 - alpha_bar_t)) x_t
#            - sqrt(alpha_bar_{t'}) (e^{-h} - 1) x0_hat_t,
#
# which is exactly the DDIM step above with eta = 0 (write its eps_theta in
# terms of x_t and x0_hat to see it). The "2M" solver instead draws a straight
# line through this step's and the previous step's x0_hat, h_prev being the
# previous step's h and r = h_prev / h, and integrates that: the same update
# with x0_hat_t replaced by
#
#     D = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_prev,
#
# which is second-order accurate for DDIM's number of network calls: the
# previous estimate is remembered, not recomputed. A line through x0_hat is
# accurate where x0_hat changes evenly in lambda, so the timesteps are spaced
# evenly in lambda, not in t. One exception, for the cosine schedule: its
# last 1% of steps is pure noise in all but name (alpha_bar falls from 2e-4
# to 2e-9, nearly 40% of the lambda range), so the first step jumps from T-1
# straight to 0.99 T and the even spacing starts there (Lu et al.'s own code
# likewise ends the cosine schedule at 0.9946 T). For guided samples, where
# the deterministic sampler is the default, this scored a better FID at 20
# steps than DDIM at 20 (README, "Quality against speed"); without a label,
# fresh noise (DDIM with eta = 1) beats any deterministic sampler, so DDIM
# stays the default there.
#
# Classifier-free guidance (Ho & Salimans 2022, eq. 6). We run the network with
# the label and with "no label" and extrapolate away from the unconditional
# prediction:
#
#     eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, none)
#
# w = 0 is the plain conditional model; larger w gives more typical, more
# clearly-that-digit samples at some cost in variety. (Some code writes the
# same thing as eps_u + s (eps_c - eps_u) with s = 1 + w.) Without a label
# there is nothing to guide towards and one network pass is made.
# -----------------------------------------------------------------------------

def predict_eps(model, x_t, t, y, guidance, precision):
    """eps_theta(x_t, t, y) with classifier-free guidance weight w = guidance."""
    B = x_t.shape[0]
    tt = torch.full((B,), t, device=x_t.device, dtype=torch.long)
    with autocast(x_t.device, precision):
        if guidance == 0 or bool((y == NULL_LABEL).all()):
            return model(x_t, tt, y).float()
        null = torch.full_like(y, NULL_LABEL)
        eps_cond, eps_uncond = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                                     torch.cat([y, null])).float().chunk(2)
    return (1 + guidance) * eps_cond - guidance * eps_uncond


def randn_like_on(x, gen):
    # Noise is drawn on the CPU from a seeded generator, then moved: the same
    # seed gives the same samples on any device, up to floating point.
    return torch.randn(x.shape, generator=gen).to(x.device)


@torch.no_grad()
def ddpm_sample(model, sched, x_T, y, guidance=0.0, clip=True, gen=None, precision="fp32", callback=None):
    """Ho et al. Algorithm 2 over all T steps, t = T-1 down to 0."""
    s = Schedule(*(v.to(x_T.device) for v in sched))
    x = x_T
    for t in reversed(range(s.T)):        # T-1, ..., 0: the same t the network saw in training
        eps = predict_eps(model, x, t, y, guidance, precision)
        if clip:
            x0_hat = ((x - (1 - s.alphas_bar[t]).sqrt() * eps) / s.alphas_bar[t].sqrt()).clamp(-1, 1)
            mean = s.posterior_coef_x0[t] * x0_hat + s.posterior_coef_xt[t] * x
        else:
            mean = (x - s.betas[t] / (1 - s.alphas_bar[t]).sqrt() * eps) / s.alphas[t].sqrt()
        # sigma_t^2 = beta~_t (Ho et al. tried beta_t too; both work). At t = 0,
        # beta~_0 = 0 (alpha_bar_{-1} = 1): the step to the clean image adds no
        # noise, so we return the mean and draw none.
        x = mean + s.posterior_variance[t].sqrt() * randn_like_on(x, gen) if t > 0 else mean
        if callback:
            callback(x)
    return x


def ddim_timesteps(T, steps):
    """S evenly spaced timesteps from T-1 down to 0, both ends included."""
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()


@torch.no_grad()
def ddim_sample(model, sched, x_T, y, steps, eta=0.0, guidance=0.0, clip=True, gen=None,
                precision="fp32", callback=None):
    """Song et al. eq. 12 on S evenly spaced timesteps."""
    ab_all = sched.alphas_bar.to(x_T.device)
    ts = ddim_timesteps(sched.T, steps)
    x = x_T
    for i, t in enumerate(ts):
        # After the last step (t = 0) comes "t = -1": the clean image, whose
        # alpha_bar is 1 (no noise left). Then x = x0_hat.
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        ab = ab_all[t]
        ab_next = ab_all[t_next] if t_next >= 0 else torch.ones_like(ab)
        eps = predict_eps(model, x, t, y, guidance, precision)
        x0_hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip:
            # Clip, then recompute the noise that the clipped x0 implies, so the
            # two stay consistent (this is what makes eta = 1 equal DDPM).
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).sqrt()
        x = ab_next.sqrt() * x0_hat + (1 - ab_next - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_next >= 0:
            x = x + sigma * randn_like_on(x, gen)
        if callback:
            callback(x)
    return x


def log_snr(alphas_bar):
    """lambda_t = log(sqrt(alpha_bar_t / (1 - alpha_bar_t))), in float64."""
    ab = alphas_bar.double()
    return 0.5 * torch.log(ab / (1 - ab))


def dpm_timesteps(alphas_bar, steps):
    """`steps` timesteps from T-1 down to 0, evenly spaced in lambda.

    With the cosine schedule the first step jumps from T-1 to 0.99 T and the
    even spacing starts there (see above); it does so whenever that last 1%
    spans more lambda than an even step would. Each lambda is rounded to the
    nearest timestep the network was trained on, then nudged so that no two
    coincide (near t = 0 lambda moves fast and several round alike)."""
    T = len(alphas_bar)
    if steps <= 2:
        return [T - 1, 0][:steps]
    lam = log_snr(alphas_bar)
    t_top = int(0.99 * T)
    if t_top < T - 1 and lam[t_top] - lam[T - 1] > (lam[0] - lam[T - 1]) / (steps - 1):
        targets = [lam[T - 1]] + list(torch.linspace(lam[t_top].item(), lam[0].item(), steps - 1, dtype=torch.float64))
    else:
        targets = list(torch.linspace(lam[T - 1].item(), lam[0].item(), steps, dtype=torch.float64))
    ts = [int((lam - v).abs().argmin()) for v in targets]
    for k in reversed(range(steps - 1)):      # upwards from t = 0: strictly increasing
        ts[k] = max(ts[k], ts[k + 1] + 1)
    ts[0] = T - 1
    for k in range(1, steps):                 # downwards from T-1: within range
        ts[k] = min(ts[k], ts[k - 1] - 1)
    return ts


@torch.no_grad()
def dpm_solver_sample(model, sched, x_T, y, steps, guidance=0.0, clip=True, precision="fp32", callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on timesteps even in log-SNR."""
    # The step coefficients are Python floats (float64), worked out on the CPU
    # from the stored schedule: Apple's MPS has no float64 tensors.
    ab_all = sched.alphas_bar.double()
    lam_all = log_snr(ab_all)
    ts = dpm_timesteps(sched.alphas_bar, steps)
    x = x_T
    x0_prev = h_prev = None
    for i, t in enumerate(ts):
        ab = ab_all[t].item()
        eps = predict_eps(model, x, t, y, guidance, precision)
        x0_hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        if i + 1 == len(ts):                 # after t = 0 comes the clean image
            x = x0_hat
        else:
            t_next = ts[i + 1]
            ab_next = ab_all[t_next].item()
            h = (lam_all[t_next] - lam_all[t]).item()
            D = x0_hat                       # the first step has no previous estimate: DDIM
            if x0_prev is not None:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_prev
            x = math.sqrt((1 - ab_next) / (1 - ab)) * x - math.sqrt(ab_next) * math.expm1(-h) * D
            x0_prev, h_prev = x0_hat, h
        if callback:
            callback(x)
    return x


def generate(model, sched, labels, image_size, sampler="ddim", steps=50, eta=0.0, guidance=0.0,
             clip=True, seed=0, batch_size=100, precision="fp32", callback=None):
    """Draw len(labels) images in batches; labels may hold NULL_LABEL for "any digit".

    Returns a CPU tensor in [-1, 1]. `callback(x_t)` sees the first batch after
    every step (used for trajectories and GIFs)."""
    device = next(model.parameters()).device
    # One generator for the whole run: batch k draws its x_T after batch k-1,
    # so a seed fixes every sample (for a given batch size).
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        x_T = torch.randn((len(y), 1, image_size, image_size), generator=gen).to(device)
        if callback and start == 0:
            callback(x_T)
        cb = callback if start == 0 else None
        if sampler == "ddpm":
            x = ddpm_sample(model, sched, x_T, y, guidance, clip, gen, precision, cb)
        elif sampler == "dpm++":
            x = dpm_solver_sample(model, sched, x_T, y, steps, guidance, clip, precision, cb)
        else:
            x = ddim_sample(model, sched, x_T, y, steps, eta, guidance, clip, gen, precision, cb)
        # A NaN or infinity (weights that overflowed in training, or --no-clip
        # letting values run away) would become a black picture or a crash
        # inside the FID; clamping would hide an infinity. Stop at once.
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        if bad:
            raise UserError(f"{bad} of {len(x)} samples in a batch came out NaN or infinite: "
                            "the model or its sampling diverged")
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_HELP = "a digit 0-9 or a number word: " + ", ".join(NUMBER_WORDS)


def parse_prompt(text):
    """'7', 'seven', ' SEVEN ' -> 7; anything else is a UserError."""
    word = text.strip().lower()
    if word.isdigit() and len(word) == 1:
        return int(word)
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word)
    raise UserError(f"unknown prompt {text.strip()!r}: use {PROMPT_HELP}")


# -----------------------------------------------------------------------------
# 6. Pictures
#
# Grids of samples, each sample as its own PNG (the layout FID tools read),
# and pictures of the two processes: the forward process on real digits under
# both schedules, and the reverse process from noise to digits, as a strip of
# snapshots or a GIF. Images go from [-1, 1] back to 8-bit grayscale.
# -----------------------------------------------------------------------------

def to_uint8(x):
    # Clamp first: samples can overshoot [-1, 1] a little (with --no-clip, a
    # lot), and casting an out-of-range value to uint8 wraps around (256
    # becomes 0, a black pixel in a white stroke). Round rather than
    # truncate, which would darken every pixel by half a level on average.
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(x, nrow, pad=2):
    """[N, 1, H, W] in [-1, 1] -> a PIL grayscale grid with `nrow` images per row."""
    from PIL import Image
    from torchvision.utils import make_grid
    # White gutters: MNIST digits are white on black, so a black gutter would
    # merge neighbouring tiles into one dark field.
    grid = make_grid(to_uint8(x.cpu()), nrow=nrow, padding=pad, pad_value=255)
    return Image.fromarray(grid[0].numpy(), mode="L")


def save_image(img, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_grid(x, path, nrow):
    return save_image(grid_image(x, nrow), path)


def save_each(x, out_dir):
    """Every image as its own grayscale PNG: DIR/00000.png, DIR/00001.png, ..."""
    from PIL import Image
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(x)):
        Image.fromarray(img[0].numpy(), mode="L").save(out_dir / f"{i:05d}.png")


def epoch_grid(ema, sched, cfg, device, precision, path):
    """The picture written after every epoch: a row per digit (or one digit).

    Seed 0 every time: each epoch's picture starts from the same noise, so
    side by side they show what training changed, not which noise was drawn.
    It uses the sampler and guidance of `sample --digit`, the pictures a user
    will get from these weights."""
    if cfg["digit"] is not None:
        labels = torch.full((60,), cfg["digit"])
    else:
        labels = torch.arange(NUM_CLASSES).repeat_interleave(6)
    x = generate(ema.eval(), sched, labels, cfg["image_size"], DEFAULT_SAMPLER_GUIDED, min(DEFAULT_STEPS, sched.T),
                 guidance=DEFAULT_GUIDANCE,
                 seed=0, precision=precision)
    save_grid(x, path, nrow=6 if cfg["digit"] is None else 10)


def label_block(img, text):
    """Put a line of text above a picture."""
    from PIL import Image, ImageDraw
    out = Image.new("L", (img.width, img.height + 14), 255)
    out.paste(img, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill=0)
    return out


def stack_vertically(images):
    from PIL import Image
    out = Image.new("L", (max(i.width for i in images), sum(i.height for i in images)), 255)
    y = 0
    for img in images:
        out.paste(img, (0, y))
        y += img.height
    return out


def forward_picture(x0, T, columns=11, seed=0):
    """Rows of x_t for t evenly spaced over 0..T-1, linear block then cosine block.

    The same noise eps is used under both schedules, so the only difference
    between the blocks is how fast alpha_bar_t falls."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=gen)
    ts = torch.linspace(0, T - 1, columns).round().long()
    blocks, table = [], {}
    for name in ("linear", "cosine"):
        sched = make_schedule(name, T)
        rows = [q_sample(x0[i:i + 1].expand(columns, -1, -1, -1), ts, eps[i:i + 1].expand(columns, -1, -1, -1),
                         sched.alphas_bar) for i in range(len(x0))]
        blocks.append(label_block(grid_image(torch.cat(rows), nrow=columns),
                                  f"{name}: t = " + ", ".join(str(int(t)) for t in ts)))
        table[name] = sched.alphas_bar[ts]
    return stack_vertically(blocks), ts, table


def trajectory_picture(frames, rows=8, columns=10):
    """frames: list of [N, 1, H, W] from noise to image; a strip per sample.

    Reading a row left to right is the reverse process: the coarse shape of
    the digit appears first, the strokes sharpen last."""
    picks = torch.linspace(0, len(frames) - 1, columns).round().long().tolist()
    n = min(rows, frames[0].shape[0])
    tiles = torch.stack([frames[j][:n] for j in picks], dim=1)        # [n, columns, 1, H, W]
    return grid_image(tiles.flatten(0, 1), nrow=columns)


def save_gif(frames, path, nrow, count=60, ms=80, hold_ms=2000):
    """An animation of the reverse process that rests on the final grid.

    At most `count` frames, evenly picked: all 1000 frames of DDPM would make
    a file of megabytes whose early frames all look like noise. GIF frames
    hold a palette of 256 colours ("P"); 8-bit grayscale fits in it exactly,
    so no shade is lost."""
    picks = torch.linspace(0, len(frames) - 1, min(count, len(frames))).round().long().tolist()
    images = [grid_image(frames[j], nrow).convert("P") for j in picks]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=[ms] * (len(images) - 1) + [hold_ms])
    return path


# -----------------------------------------------------------------------------
# 7. Evaluation: how good are the samples?
#
# The Frechet Inception Distance (Heusel et al. 2017) fits a Gaussian to the
# features of real and of generated images and measures the distance between
# the two Gaussians,
#
#     FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
#
# The usual features come from an Inception network trained on ImageNet. That
# needs a download, and ImageNet features see MNIST digits as odd blobs. Here
# the features are the 128-d penultimate layer of a small classifier trained on
# MNIST itself, so the numbers speak about digits, but they are NOT comparable
# with Inception-based FIDs in papers; compare them with each other and with
# the "floor": the FID of n real training images against the test set, which
# is what a perfect generator would score at the same n (FID is biased upwards
# for small n); for samples of chosen digits, real images of those digits.
#
# The classifier also tells which digit each sample looks like: for
# conditional sampling, how often it is the digit asked for; for unconditional
# sampling, whether all ten digits come out about equally often.
# -----------------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN; ~99.4% on the MNIST test set after 3 epochs."""

    def __init__(self):
        super().__init__()
        def conv(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
        self.body = nn.Sequential(conv(1, 32), conv(32, 32), nn.MaxPool2d(2),
                                  conv(32, 64), conv(64, 64), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, NUM_CLASSES))

    def features(self, x):
        if x.shape[-1] != 28:
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def classify(clf, x, batch_size=1000):
    """Features [N, 128] (float64) and predicted digits [N]."""
    clf.eval()
    dev = next(clf.parameters()).device
    feats = [clf.features(x[i:i + batch_size].to(dev)).cpu().double() for i in range(0, len(x), batch_size)]
    feats = torch.cat(feats)
    return feats, clf.head(feats.float().to(dev)).argmax(1).cpu()


def train_classifier(x, y, device, precision, epochs=3, batch_size=128, seed=0):
    torch.manual_seed(seed)
    clf = Classifier().to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    clf.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            # Random shifts of up to 2 pixels: cheap augmentation, +0.2% accuracy.
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(F.pad(xb, (2, 2, 2, 2), value=-1), (dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]
            with autocast(device, precision):
                loss = F.cross_entropy(clf(xb.to(device)).float(), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}", flush=True)
    return clf.eval()


def gaussian_stats(feats):
    """Mean and covariance of [N, D] features: the Gaussian that FID compares."""
    return feats.mean(0), torch.cov(feats.T)


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix via eigh."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), and the inner matrix is
    symmetric PSD, so a symmetric eigendecomposition is all we need."""
    # float64 throughout: FID subtracts large traces from each other, and in
    # float32 the rounding error alone can be larger than a good model's score.
    mu1, cov1, mu2, cov2 = (a.double() for a in (mu1, cov1, mu2, cov2))
    s1 = sqrtm_psd(cov1)
    eig = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0)
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * eig.sqrt().sum())


def fid(feats_a, feats_b):
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def same_digits(y_real, labels, gen):
    """Indices of random real images holding the same digits as `labels`: as
    many 0s as labels has 0s, and so on (fewer if MNIST runs out)."""
    perm = torch.randperm(len(y_real), generator=gen)
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    return torch.cat([perm[y_real[perm] == d][:int(counts[d])] for d in range(NUM_CLASSES)])


def load_or_train_classifier(path, data_dir, device, precision):
    # Training the classifier takes minutes, so it is cached; like every file we
    # read, it is loaded as plain data (weights_only).
    path = Path(path)
    clf = Classifier()
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            clf.load_state_dict(state["classifier"])
            print(f"classifier: {path}")
            return clf.to(device).eval()
        except Exception:
            raise UserError(f"classifier {path} is unreadable or not a ddpm_mnist classifier; delete it to retrain") from None
    print(f"classifier: training one on MNIST (cached at {path})")
    x, y = load_mnist(data_dir, train=True)
    clf = train_classifier(x, y, device, precision)
    atomic_save({"classifier": clf.state_dict()}, path)
    return clf


# -----------------------------------------------------------------------------
# How fast: training against the machine's peak
#
# A training step of this U-Net is almost all convolutions, which run as
# matrix multiplies. So the yardstick is the rate of one large matrix multiply
# (2 n^3 FLOPs for two n x n matrices) in the same precision on the same
# machine:
#
#     share of peak = FLOPs per training image x images/s / matmul FLOP/s
#
# FLOPs per image are counted, not estimated: torch.utils.flop_counter over
# one forward and backward pass (a multiply-add counts as 2 FLOPs). A step is
# the real train_step: forward, backward, clipping, AdamW and the EMA update.
# Each timing is the median of several repeats after a warm-up, so one stall
# of the machine does not decide the figure. The images are random: speed does
# not depend on what the pixels show, so bench needs no MNIST.
# -----------------------------------------------------------------------------

def sync(device):
    # GPUs run asynchronously; a timer must wait for the work to finish.
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_seconds(fn, repeats, device):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops_per_second(device, precision, repeats):
    """The rate of n x n matrix multiplies in this precision: the machine's peak."""
    n, k = (8192, 10) if device.type == "cuda" else (2048, 4)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b                                                  # warm-up
    return k * 2 * n ** 3 / median_seconds(lambda: [a @ b for _ in range(k)], repeats, device)


def training_flops_per_image(model, sched, x0, y, device):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(model, x0, y, sched, torch.Generator().manual_seed(0), device).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x0)


def machine_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def cmd_bench(args):
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        raise UserError("--steps, --repeats and --batch-size must be at least 1")
    device = pick_device(args.device)
    # auto: fp32, and bf16 too where the hardware has it, to compare the two
    # (on a CPU, whether or not bf16 would win the timing of pick_precision)
    if args.precision != "auto":
        precisions = [args.precision]
    else:
        precisions = ["fp32"] + (["bf16"] if has_native_bf16(device) else [])
    cfg = dict(channels=args.channels, blocks=1, image_size=28, schedule="cosine", timesteps=1000)
    check_model_config(cfg)
    sched = make_schedule(cfg["schedule"], cfg["timesteps"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    x0 = (torch.rand(args.batch_size, 1, 28, 28) * 2 - 1).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,)).to(device)
    flops = training_flops_per_image(model, sched, x0, y, device)
    print(f"machine: {machine_name(device)} | torch {torch.__version__}")
    print(f"U-Net {count_params(model):,} parameters: {flops / 1e9:.3f} GFLOP per training image "
          f"(forward + backward, torch.utils.flop_counter)")
    print(f"each figure: median of {args.repeats} repeats; a training repeat is {args.steps} steps of {args.batch_size} images")
    for precision in precisions:
        peak = matmul_flops_per_second(device, precision, args.repeats)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        gen = torch.Generator().manual_seed(0)

        def steps():
            for i in range(args.steps):
                train_step(model, ema, opt, lr_sched, x0, y, sched, gen, device, precision, i)
        steps()                                                # warm-up
        rate = args.steps * args.batch_size / median_seconds(steps, args.repeats, device)
        print(f"{precision}: matmul peak {peak / 1e9:,.0f} GFLOP/s | training {rate:,.0f} img/s, "
              f"{60000 / rate:,.0f} s per MNIST epoch, {rate * flops / 1e9:,.0f} GFLOP/s = "
              f"{100 * rate * flops / peak:.0f}% of peak")
    if args.precision == "auto":
        print(f"--precision auto picks {pick_precision('auto', device)} on this machine")
    if args.profile:
        # Where the time goes, by operator, for the last precision above.
        # KINETO_LOG_LEVEL 5 silences the profiler library's start-up chatter
        # (a CUDA build of torch on a machine without a GPU logs an "ERROR").
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            steps()
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=12))


# -----------------------------------------------------------------------------
# 8. The command line
#
#   train     section 4; writes ddpm_mnist.pt and a picture per epoch
#   sample    section 5 and 6; uses ./ddpm_mnist.pt, else the shipped model
#   forward   section 2 as a picture; needs the data, no model
#   evaluate  section 7
#   bench     training speed against the machine's peak (end of section 7)
#   export    the EMA weights alone in fp16, the form shipped in samples/
#
# Every user mistake (a missing file, a digit that is not a digit, an
# impossible step count) becomes a UserError: one line on stderr and exit
# status 1, never a traceback. argparse's own errors are one line too.
#
# The sampling defaults were chosen by measurement (README, "Results"), 20
# steps each. For a requested digit, DPM-Solver++(2M) with guidance w = 0.5:
# at n = 1000 it scored FID 14.9 against 16.1 for deterministic DDIM with as
# many network calls, and w = 0.5 is the best FID of w = 0, 0.3, 0.4, 0.5, 0.75, 1
# and 2 that draws the right digit at least 99% of the time (99.5%; w = 0.4
# scored 12.8 but 98.9%, w = 2 100% but samples so alike that FID is worse).
# For any digit, DDIM with eta = 1: fresh noise at every step corrects the
# weaker unconditional model's mistakes (FID 91 against 159 for eta = 0,
# n = 500).
# Batches of 100 images: on a 2-core CPU, guided sampling took 70 to 77 s per
# 1000 images in batches of 100 and 93 s in batches of 500.
# -----------------------------------------------------------------------------

DEFAULT_CKPT = "ddpm_mnist.pt"
SHIPPED_CKPT = Path(__file__).resolve().parent / "samples" / "ddpm_mnist.pt"
DEFAULT_SAMPLER_GUIDED = "dpm++"    # a digit asked for: DPM-Solver++(2M), deterministic
DEFAULT_SAMPLER_UNGUIDED = "ddim"   # any digit: DDIM ...
DEFAULT_ETA_UNGUIDED = 1.0          # ... with fresh noise at every step
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 0.5


def resolve_ckpt(arg):
    """--ckpt if given, else ./ddpm_mnist.pt if it exists, else the shipped model."""
    # Your own model wins over the shipped one as soon as `train` has written
    # it, so "train, then sample" needs no flags; a fresh clone still draws
    # digits at once. The line load_for_sampling prints says which file won.
    if arg is not None:
        return Path(arg)
    if Path(DEFAULT_CKPT).is_file():
        return Path(DEFAULT_CKPT)
    if SHIPPED_CKPT.is_file():
        return SHIPPED_CKPT
    raise UserError(f"no checkpoint: train one with 'python ddpm_mnist.py train' or pass --ckpt")


def resolve_sampler(args, guided):
    """Fill in --sampler and --eta where they were left to their defaults."""
    if args.sampler is None:   # an explicit --eta asks for DDIM
        args.sampler = "ddim" if args.eta is not None else (
            DEFAULT_SAMPLER_GUIDED if guided else DEFAULT_SAMPLER_UNGUIDED)
    if args.sampler != "ddim":
        if args.eta is not None:
            raise UserError(f"--eta applies to DDIM only; use --sampler ddim (not {args.sampler})")
        args.eta = 0.0 if args.sampler == "dpm++" else 1.0   # what the sampler does, for the record
    elif args.eta is None:
        args.eta = 0.0 if guided else DEFAULT_ETA_UNGUIDED
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta {args.eta}: must be between 0 and 1")


def load_for_sampling(args, guided):
    resolve_sampler(args, guided)
    if args.sampler == "ddpm" and args.steps is not None:
        raise UserError("--steps applies to DPM-Solver++ and DDIM; DDPM always takes all T steps")
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    path = resolve_ckpt(args.ckpt)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    cfg = ckpt["config"]
    sched = make_schedule(cfg["schedule"], cfg["timesteps"])
    if args.steps is None:   # the default, but never more steps than the model has
        args.steps = min(DEFAULT_STEPS, sched.T)
    if args.sampler != "ddpm" and not 1 <= args.steps <= sched.T:
        raise UserError(f"--steps {args.steps}: {args.sampler.upper()} takes 1 to T = {sched.T} steps for this model")
    if args.guidance < 0:
        raise UserError("--guidance must be 0 or more")
    print(f"checkpoint: {path} ({count_params(model):,} parameters, trained {ckpt.get('step', '?')} steps) | "
          f"{device} {precision}")
    return model, sched, cfg, precision


def sampler_kwargs(args, precision):
    # sample and evaluate share their sampling flags; this is the one place
    # that turns them into generate()'s arguments.
    return dict(sampler=args.sampler, steps=args.steps, eta=args.eta, guidance=args.guidance,
                clip=not args.no_clip, seed=args.seed, batch_size=args.batch_size, precision=precision)


def describe_sampler(args, sched, guided):
    """e.g. 'DDIM 20 steps, eta 0.0, guidance 2.0'; guidance only where it applies."""
    how = {"ddpm": f"DDPM {sched.T} steps",
           "dpm++": f"DPM-Solver++(2M) {args.steps} steps",
           "ddim": f"DDIM {args.steps} steps, eta {args.eta}"}[args.sampler]
    return how + (f", guidance {args.guidance}" if guided else "")


def cmd_sample(args):
    if args.n < 1 or args.batch_size < 1 or (args.per_class is not None and args.per_class < 1):
        raise UserError("--n, --per-class and --batch-size must be at least 1")
    digit = parse_prompt(args.prompt) if args.prompt is not None else args.digit
    if digit is not None and not 0 <= digit <= 9:
        raise UserError(f"--digit {digit}: use a digit from 0 to 9")
    # Check what can be checked before the (slower) model load, so a typo
    # costs no waiting; step counts need the model's T and are checked there.
    guided = digit is not None or args.per_class is not None or args.interactive
    model, sched, cfg, precision = load_for_sampling(args, guided)
    kw = sampler_kwargs(args, precision)

    if args.interactive:
        return interactive(model, sched, cfg, args, kw)

    if args.per_class is not None:
        labels, nrow = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class), args.per_class
    else:
        labels = torch.full((args.n,), NULL_LABEL if digit is None else digit)
        nrow = math.ceil(math.sqrt(args.n))
    # For the trajectory and the GIF we keep every intermediate x_t of the
    # first batch (at most 64 images), from the initial noise to the result.
    frames = []
    keep = args.trajectory or args.gif
    t0 = time.time()
    x = generate(model, sched, labels, cfg["image_size"], **kw,
                 callback=(lambda x_t: frames.append(x_t[:64].clamp(-1, 1).cpu())) if keep else None)
    took = time.time() - t0
    what = "unconditional" if digit is None and args.per_class is None else (
        f"digit {digit}" if args.per_class is None else f"{args.per_class} per digit")
    print(f"{len(x)} samples ({what}, {describe_sampler(args, sched, guided)}) in {took:.1f} s, "
          f"{len(x) / took:.1f} img/s")
    print(f"wrote {save_grid(x, args.out, nrow)}")
    if args.out_dir:
        save_each(x, args.out_dir)
        print(f"wrote {len(x)} PNGs to {args.out_dir}/")
    if args.trajectory:
        print(f"wrote {save_image(trajectory_picture(frames), args.trajectory)}")
    if args.gif:
        first = frames[0].shape[0]
        print(f"wrote {save_gif(frames, args.gif, nrow=min(nrow, first))}")


def interactive(model, sched, cfg, args, kw):
    """One prompt per line from stdin -> one grid per prompt. Empty line or EOF ends.

    The model is loaded once, so each further prompt costs only the sampling.
    A bad word is reported and skipped rather than ending the session."""
    pattern = args.out if args.out != SAMPLE_OUT else "samples/prompt_{digit}.png"
    if "{digit}" not in pattern:
        p = Path(pattern)
        pattern = str(p.with_name(p.stem + "_{digit}" + p.suffix))
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print(f"prompt ({PROMPT_HELP}; empty line to quit)> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        try:
            digit = parse_prompt(line)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        x = generate(model, sched, torch.full((args.n,), digit), cfg["image_size"], **kw)
        print(save_grid(x, pattern.format(digit=digit), math.ceil(math.sqrt(args.n))), flush=True)


def cmd_forward(args):
    if not 1 <= args.n <= 64:
        raise UserError("--n: show between 1 and 64 images")
    if args.timesteps < 2:
        raise UserError("--timesteps must be at least 2")
    x0, _ = load_mnist(args.data_dir, train=True, limit=args.n)
    img, ts, table = forward_picture(x0, args.timesteps)
    print("      t  alpha_bar linear  alpha_bar cosine")
    for i, t in enumerate(ts.tolist()):
        print(f"  {t:5d}  {table['linear'][i]:16.5f}  {table['cosine'][i]:16.5f}")
    print(f"wrote {save_image(img, args.out)}")


def cmd_evaluate(args):
    if args.n < 2 or args.batch_size < 1:
        raise UserError("--n must be at least 2 (FID needs a covariance) and --batch-size at least 1")
    # 1. the judge: a classifier, and the features of the real test images
    model, sched, cfg, precision = load_for_sampling(args, args.conditional)
    device = next(model.parameters()).device
    clf = load_or_train_classifier(args.classifier, args.data_dir, device, precision)
    x_test, y_test = load_mnist(args.data_dir, train=False)
    test_feats, test_pred = classify(clf, x_test)
    acc = (test_pred == y_test).float().mean().item()
    print(f"classifier test accuracy: {100 * acc:.2f}%" + ("" if acc >= 0.992 else "  (below 99.2%: FIDs are less reliable)"))

    # Conditional: 0, 1, ..., 9, 0, 1, ... so every digit gets n/10 samples.
    # Unconditional: the model picks the digit; the histogram shows whether it
    # picks them as often as MNIST has them (about 10% each).
    if args.conditional:
        labels = torch.arange(args.n) % NUM_CLASSES
    else:
        labels = torch.full((args.n,), NULL_LABEL)

    # The floor: n real training images (not the test images themselves, which
    # would score 0) against the test set. A generator cannot beat this at n.
    x_real, y_real = load_mnist(args.data_dir, train=True)
    gen = torch.Generator().manual_seed(args.seed)
    real_idx = torch.randperm(len(x_real), generator=gen)[:args.n]
    floor = fid(classify(clf, x_real[real_idx])[0], test_feats)
    if args.conditional:
        # Asked for n/10 of each digit, even a perfect generator returns a
        # balanced set, which MNIST is not (the test set has 1135 ones and
        # 892 fives): the mismatch alone costs some FID. So conditional
        # samples are also compared with, and judged against, real images of
        # the very digits they were asked for.
        same_idx = same_digits(y_real, labels, gen)
        same_floor = fid(classify(clf, x_real[same_idx])[0], test_feats)
    # 2. the samples, timed; 3. their features and the classifier's verdicts
    t0 = time.time()
    x = generate(model, sched, labels, cfg["image_size"], **sampler_kwargs(args, precision))
    took = time.time() - t0
    feats, pred = classify(clf, x)
    score = fid(feats, test_feats)

    mode = "conditional" if args.conditional else "unconditional"
    print(f"samples: {args.n} {mode}, {describe_sampler(args, sched, args.conditional)}, seed {args.seed}")
    print(f"sampling time: {took:.1f} s ({1000 * took / args.n:.1f} s per 1000 images)")
    print(f"FID (classifier features, vs {len(x_test)} test images): {score:.3f}")
    print(f"floor (FID of {len(real_idx)} real training images): {floor:.3f}"
          + ("" if args.conditional else f"   ratio {score / max(floor, 1e-12):.2f}x"))
    if args.conditional:
        print(f"floor with the samples' digits ({len(same_idx)} real training images): {same_floor:.3f}"
              f"   ratio {score / max(same_floor, 1e-12):.2f}x")
    counts = torch.bincount(pred, minlength=NUM_CLASSES)
    if args.conditional:
        per = [(pred[labels == d] == d).float().mean().item() for d in range(NUM_CLASSES)]
        print("accuracy per digit: " + "  ".join(f"{d}:{100 * a:.1f}%" for d, a in enumerate(per)))
        print(f"accuracy overall: {100 * (pred == labels).float().mean().item():.2f}%")
    else:
        print("class histogram: " + "  ".join(f"{d}:{100 * c / args.n:.1f}%" for d, c in enumerate(counts.tolist())))
    if args.out_dir:
        save_each(x, args.out_dir)
        print(f"wrote {len(x)} PNGs to {args.out_dir}/")


def cmd_export(args):
    """Keep only what sampling needs: the EMA weights in fp16 and the config.

    The optimiser state (twice the weights) and the raw weights are dropped;
    fp16 halves the rest. Samples from the export match the full checkpoint up
    to rounding (a test compares them)."""
    ckpt = load_checkpoint(args.ckpt)
    model_from_checkpoint(ckpt, args.ckpt)   # validates that the weights fit
    slim = dict(format="ddpm_mnist", config=ckpt["config"], step=ckpt.get("step"),
                ema={k: v.half() for k, v in ckpt["ema"].items()})
    atomic_save(slim, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def channels_arg(text):
    # "32,64,128" -> [32, 64, 128]. Whether the widths suit the U-Net (multiples
    # of 8 for GroupNorm, ...) is checked later, with the image size at hand.
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 32,64,128, got {text!r}") from None


SAMPLE_OUT = "sample.png"


def build_parser():
    p = Parser(prog="ddpm_mnist.py", description="A denoising diffusion model on MNIST, in one file.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(sp):
        sp.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
        sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast where the GPU has it or it times faster on the CPU, else fp32")

    def sampling(sp, n):
        sp.add_argument("--ckpt", default=None,
                        help=f"default: ./{DEFAULT_CKPT} if it exists, else the shipped samples/ddpm_mnist.pt")
        sp.add_argument("--n", type=int, default=n, help="number of samples")
        sp.add_argument("--sampler", default=None, choices=["dpm++", "ddim", "ddpm"],
                        help=f"default: {DEFAULT_SAMPLER_GUIDED} for a digit, {DEFAULT_SAMPLER_UNGUIDED} "
                             f"(eta {DEFAULT_ETA_UNGUIDED:g}) for any digit, ddim when --eta is given")
        sp.add_argument("--steps", type=int, default=None,
                        help=f"DPM-Solver++ or DDIM steps, 1..T (default {DEFAULT_STEPS}); DDPM takes all T")
        sp.add_argument("--eta", type=float, default=None,
                        help="DDIM noise, and giving it selects DDIM: 0 deterministic, 1 like DDPM "
                             "(default with ddim: 0 for a digit, 1 for any digit)")
        sp.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance w: eps = (1+w) eps(x,y) - w eps(x); 0 = none")
        sp.add_argument("--no-clip", action="store_true", help="do not clip the x0 estimate to [-1, 1]")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--batch-size", type=int, default=100, help="images per network call")
        sp.add_argument("--out-dir", default=None, help="also write every sample as DIR/00000.png, ...")
        common(sp)

    t = sub.add_parser("train", help="train the model")
    t.add_argument("--data-dir", default="./data", help="holds MNIST/raw/; downloaded when missing")
    t.add_argument("--digit", type=int, default=None, choices=range(10), metavar="D", help="train on one digit only")
    t.add_argument("--limit", type=int, default=None, help="keep the first N images (after --digit)")
    t.add_argument("--image-size", type=int, default=28)
    t.add_argument("--schedule", default="cosine", choices=["cosine", "linear"])
    t.add_argument("--timesteps", type=int, default=1000, help="T")
    t.add_argument("--channels", type=channels_arg, default=[32, 64, 128], help="U-Net widths per level")
    t.add_argument("--epochs", type=int, default=None,
                   help=f"default: enough to see {TRAIN_IMAGES:,} images (5 on full MNIST)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint written after every epoch")
    t.add_argument("--resume", action="store_true", help="continue from --ckpt with its own config")
    common(t)

    s = sub.add_parser("sample", help="draw digits from a trained model")
    sampling(s, n=64)
    s.add_argument("--digit", type=int, default=None, help="draw this digit (default: any digit)")
    s.add_argument("--prompt", default=None, help=f"like --digit: {PROMPT_HELP}")
    s.add_argument("--per-class", type=int, default=None, metavar="K", help="a row of K samples per digit")
    s.add_argument("--interactive", action="store_true", help="read prompts from stdin, one grid each")
    s.add_argument("--out", default=SAMPLE_OUT, help="the grid PNG")
    s.add_argument("--trajectory", default=None, metavar="FILE.png", help="also draw the reverse process")
    s.add_argument("--gif", default=None, metavar="FILE.gif", help="also animate the reverse process")

    f = sub.add_parser("forward", help="picture the forward (noising) process; no model needed")
    f.add_argument("--data-dir", default="./data")
    f.add_argument("--n", type=int, default=4, help="how many training images")
    f.add_argument("--timesteps", type=int, default=1000)
    f.add_argument("--out", default="forward.png")

    e = sub.add_parser("evaluate", help="FID and digit accuracy of the samples")
    sampling(e, n=10000)
    e.add_argument("--conditional", action="store_true", help="an equal number of each digit, guided")
    e.add_argument("--data-dir", default="./data")
    e.add_argument("--classifier", default="mnist_classifier.pt")

    b = sub.add_parser("bench", help="training speed at fp32 and bf16 against the matmul peak; no data needed")
    b.add_argument("--channels", type=channels_arg, default=[32, 64, 128], help="U-Net widths per level")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    b.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    b.add_argument("--profile", action="store_true", help="also print torch.profiler's table of the slowest operators")
    common(b)

    x = sub.add_parser("export", help="write the EMA weights alone, in fp16 (for shipping)")
    x.add_argument("--ckpt", default=DEFAULT_CKPT)
    x.add_argument("--out", default="samples/ddpm_mnist.pt")
    return p


def main(argv=None):
    # argv is a parameter so the tests can drive the real CLI in-process. A
    # UserError is the user's to fix: one line, exit 1. Anything else is a bug
    # in this file and keeps its traceback, which is what a bug report needs.
    args = build_parser().parse_args(argv)
    commands = dict(train=train, sample=cmd_sample, forward=cmd_forward, evaluate=cmd_evaluate, bench=cmd_bench,
                    export=cmd_export)
    try:
        commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
