#!/usr/bin/env python3
"""ddpm_mnist.py: a denoising diffusion model (DDPM) on MNIST, in one file.

Sections 1-6 are the method, in the order you would learn it: data, the
forward process, the U-Net, the loss and training loop, the DDPM sampler,
DDIM and guidance. Sections 7-9 are what a run needs around it (devices,
checkpoints, pictures, evaluation, the command line): a first read can skip
them. Papers are cited by author, year and equation number; "Ho et al." is
the DDPM paper, Ho, Jain & Abbeel 2020.
"""

import argparse
import contextlib
import copy
import io
import math
import os
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# Defaults: the knobs of a training run and of sampling, set here only (the loss's, in section 4).
TRAIN = dict(
    channels=[32, 64, 128],  # U-Net widths, one per resolution: 28, 14, 7 pixels
    schedule="cosine",       # how fast the noise grows: cosine or linear (section 2)
    timesteps=1000,          # T, the number of noising steps
    epochs=None,             # None: as many as it takes to see TRAIN_IMAGES images
    batch_size=32,           # small batches: many optimisation steps in a short run
    lr=2e-3,                 # AdamW's peak learning rate
    seed=0,                  # fixes the weights and every random draw of training
    digit=None,              # train on one digit only
    limit=None,              # keep the first N training images (after `digit`)
)
TRAIN_IMAGES = 300_000       # the default length of a run: 5 epochs of MNIST
GUIDANCE = 0.25              # classifier-free guidance weight w (section 6)
STEPS = 20                   # DDIM's steps per sample, each one or two network calls
SIGMA_MAX = 80               # DDIM starts where the noise is 80 times the signal (section 6)
NOISY_BELOW = 0.05           # DDIM's eta is 1 while alpha_bar_t is below this (section 6),
ETA_LATER = 0.5              # then this: less noise, less blur, still washing out errors
CKPT = "ddpm_mnist.pt"       # what `train` writes and `sample` reads first
SHIPPED = Path(__file__).resolve().parent / "samples" / "ddpm_mnist.pt"


class UserError(Exception):
    """A mistake the user can fix. The CLI prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# 1. Data
#
# MNIST: 60,000 training images of digits, 28x28, grayscale, labelled 0-9.
# Diffusion adds Gaussian noise of unit variance, so images must live on a
# comparable scale centred on zero (Ho et al. 2020, section 3.3): pixels go
# from [0, 255] to 2 * pixel / 255 - 1 in [-1, 1]. The set is small enough to
# decode once into one tensor and index random batches from it.
def load_mnist(data_dir, train=True, digit=None, limit=None):
    """Images float32 [N, 1, 28, 28] in [-1, 1], labels int64 [N]: data_dir/MNIST/raw, downloaded if missing."""
    from torchvision import datasets
    raw = Path(data_dir) / "MNIST" / "raw"
    try:   # quietly: torchvision prints a line per download mirror it tries
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds = datasets.MNIST(data_dir, train=train, download=True)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise UserError(f"MNIST is not in {raw} nor could it be downloaded ({why}); put the *-ubyte files there") from None
    x, y = ds.data, ds.targets                 # uint8 [N, 28, 28], int64 [N]
    if len(x) != len(y):
        split = "train" if train else "t10k"
        raise UserError(f"{raw / f'{split}-images-idx3-ubyte'} holds {len(x)} images but "
                        f"{split}-labels-idx1-ubyte {len(y)} labels; replace the pair")
    if digit is not None:
        x, y = x[y == digit], y[y == digit]
    if limit is not None:
        x, y = x[:limit], y[:limit]            # "the first N" after the digit filter
    if len(x) == 0:
        raise UserError("no training images are left after --digit/--limit")
    return x.unsqueeze(1).float() / 127.5 - 1, y


# -----------------------------------------------------------------------------
# 2. The forward process and noise schedules
#
# Indexing, once for the whole file: timesteps are 0-based, t in {0, ..., T-1},
# as arrays are (mixing 0- and 1-based is a classic bug). x_t is the image after
# t + 1 steps of noise, the paper's x_{t+1}; the clean image, the papers' x_0, is
# x_start (the name in Ho et al.'s code), so that no formula means two things.
#
# The forward process destroys x_start with Gaussian noise over T steps, each
# keeping sqrt(1 - beta_t) of the signal (Ho et al. eq. 2):
#
#     q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I).
#
# Gaussians compose, so any step can be reached at once (eq. 4), with
# alpha_t = 1 - beta_t and alpha_bar_t = prod_{s <= t} alpha_s, the share of
# signal variance left, falling from about 1 to about 0:
#
#     x_t = sqrt(alpha_bar_t) x_start + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I).
#
# How fast it falls is the schedule. Linear: beta_t from 1e-4 to 0.02 (Ho et al.
# section 4), which on small images leaves the last third of the steps almost pure
# noise. Cosine (Nichol & Dhariwal 2021, eq. 17): alpha_bar = f(t + 1) / f(0),
# f(t) = cos^2((t/T + 0.008) / 1.008 * pi/2), betas clipped at 0.999: alpha_bar
# falls slowly at both ends, linearly between.


class Schedule(namedtuple("Schedule", "betas alphas alphas_bar posterior_variance")):
    """Every per-timestep constant the equations use, indexed by t = 0..T-1 (posterior_variance: beta~_t, eq. 7)."""

    @property
    def T(self):
        return len(self.betas)

    def to(self, device):
        return Schedule(*(v.to(device) for v in self))


def make_schedule(name, T):
    if name == "linear":     # scaled by 1000/T: any T adds as much noise as T = 1000 (as Nichol & Dhariwal's code does)
        betas = torch.linspace(0.1 / T, 20 / T, T, dtype=torch.float64)
    else:                    # cosine: alpha_bar_t = f(t + 1) / f(0), so beta_t = 1 - f(t + 1) / f(t)
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    betas = betas.clamp(max=0.999)
    alphas = 1 - betas                                                 # alpha_t = 1 - beta_t
    alphas_bar = torch.cumprod(alphas, dim=0)                          # alpha_bar_t = prod_{s <= t} alpha_s
    alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])   # 1 for x_start
    posterior_variance = betas * (1 - alphas_bar_prev) / (1 - alphas_bar)   # beta~_t (eq. 7)
    # Computed in float64, since alpha_bar gets tiny, then stored as float32:
    # Apple's GPUs have no float64, and float32 is ample for the samplers.
    return Schedule(*(v.float() for v in (betas, alphas, alphas_bar, posterior_variance)))


def q_sample(x_start, t, eps, alphas_bar):
    """x_t ~ q(x_t | x_start) (Ho et al. eq. 4) for one timestep per image, given the noise eps."""
    ab = alphas_bar[t].view(-1, 1, 1, 1)                               # one alpha_bar_t per image
    return ab.sqrt() * x_start + (1 - ab).sqrt() * eps                 # sqrt(ab) x_start + sqrt(1 - ab) eps


# -----------------------------------------------------------------------------
# 3. The network: a compact U-Net eps_theta(x_t, t, y)
#
# It sees a noisy image x_t, the timestep t and the digit y, and predicts the
# noise eps that was mixed in: an output shaped like its input, so a U-Net
# (Ronneberger et al. 2015, as in Ho et al. appendix B),
#
#   28x28 --down--> 14x14 --down--> 7x7 (+ self-attention) --up--> 14 --up--> 28,
#
# one residual block per level, skip connections carrying each resolution's
# detail from the way down to the way up. t (a sinusoidal embedding, like a
# Transformer's positions) and y enter every block as a scale s and shift b
# (FiLM, Perez et al. 2018; after a GroupNorm, Dhariwal & Nichol 2021's AdaGN):
#     h -> GroupNorm(h) * (1 + s(t, y)) + b(t, y).
# y has 11 embeddings, one per digit and one for "no label", shown 20% of the
# time, so one network learns p(x | y) and p(x), which guidance combines.

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES   # the extra "no label" class


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps: [B] -> [B, dim]."""
    # Near t get similar vectors, far-apart t different ones: a raw t would be badly scaled.
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)   # f_k = 10000^(-2k/d)
    angles = t.float()[:, None] * freqs[None, :]                                        # t f_k
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def zero_init(module):
    # The last layer of each residual branch starts at zero, so every block starts as its skip
    # path and the untrained U-Net outputs 0, the mean of the noise (as in Ho et al.'s code).
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """skip(x) + conv(silu(norm(conv(silu(norm(x)))) * (1 + scale(t, y)) + shift(t, y))),
    skip being the identity, or a 1x1 conv where the width changes."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)     # GroupNorm: per image, so a sample ignores its batch
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift          # "1 +": a FiLM output of zero leaves h alone
        return self.skip(x) + self.conv2(F.silu(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of the lowest-resolution map (7x7), residual: far-apart
    strokes related in one layer. Its cost grows with the square of the pixel count: hence only there."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)          # each [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps_theta(x_t, t, y): [B, 1, 28, 28], [B], [B] -> [B, 1, 28, 28]; 1 to 3 `channels`, multiples of 8."""

    def __init__(self, channels=(32, 64, 128)):
        super().__init__()
        c0 = self.c0 = channels[0]
        emb = 4 * c0                                       # the conditioning vector's width, as in Ho et al.
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, emb)
        self.stem = nn.Conv2d(1, c0, 3, padding=1)
        # Down: a block per level, kept as its skip, then a strided 3x3 conv halves the resolution.
        self.down = nn.ModuleList(ResBlock(a, b, emb) for a, b in zip([c0, *channels], channels))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in channels[:-1])
        c = channels[-1]
        self.mid1, self.mid_attn, self.mid2 = ResBlock(c, c, emb), SelfAttention(c), ResBlock(c, c, emb)
        # Up: the mirror image, each level with its skip; resize, then convolve, as a transposed
        # convolution tends to print a checkerboard pattern (Odena et al. 2016).
        self.up = nn.ModuleList(ResBlock(2 * c, c, emb) for c in reversed(channels))
        self.upsample = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(a, b, 3, padding=1))
                                      for a, b in zip(channels[:0:-1], channels[-2::-1]))
        self.out_norm = nn.GroupNorm(8, c0)
        self.out_conv = zero_init(nn.Conv2d(c0, 1, 3, padding=1))

    def forward(self, x_t, t, y):
        emb = self.time_mlp(timestep_embedding(t, self.c0)) + self.label_emb(y)   # "when" plus "what"
        h, skips = self.stem(x_t), []
        for i, block in enumerate(self.down):                          # 28 -> 14 -> 7
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):                            # 7 -> 14 -> 28
            h = block(torch.cat([h, skips.pop()], dim=1), emb)        # with the same level's skip
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.out_conv(F.silu(self.out_norm(h)))


# -----------------------------------------------------------------------------
# 4. The loss and the training loop
#
# Ho et al. show (eq. 8-12) that learning the reverse process comes down, up
# to weights, to predicting the noise: draw x_start, t uniformly from {0..T-1}
# and eps ~ N(0, I), form x_t by eq. 4, and regress (eq. 14, Algorithm 1)
#
#     L_simple = E || eps - eps_theta(x_t, t, y) ||^2.
#
# Around it: Min-SNR weights (Hang et al. 2023), label dropout for guidance (Ho
# & Salimans 2022, Algorithm 1), AdamW with warm-up, cosine decay and gradient
# clipping, and an exponential moving average (EMA) of the weights, which we
# sample with: it smooths out the raw weights' jitter. Every random draw comes
# from one CPU generator, the same on any device and saved with a run, so that
# a resumed run goes on exactly. The loss and the samplers stay in float32.

P_UNCOND = 0.2
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999
WARMUP_FRACTION = 0.05


def autocast(device, precision):
    """bfloat16 autocast for the network where `precision` is "bf16" (section 7 decides)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def diffusion_loss(model, x_start, y, sched, gen):
    """L_simple on one batch (Algorithm 1), each image's error weighted by min(SNR_t, 5) / SNR_t,
    SNR_t = alpha_bar_t / (1 - alpha_bar_t) (Min-SNR-5, Hang et al. 2023). Why: with x_start_hat the
    clean image that eps_theta implies (eq. 15), ||eps - eps_theta||^2 = SNR_t ||x_start - x_start_hat||^2,
    so L_simple weights step t by SNR_t: the nearly clean steps, all invisible detail, dominate."""
    B, device = len(x_start), x_start.device
    t = torch.randint(0, sched.T, (B,), generator=gen)            # t ~ Uniform({0, ..., T-1})
    eps = torch.randn(x_start.shape, generator=gen)               # eps ~ N(0, I)
    drop = torch.rand(B, generator=gen) < P_UNCOND                # label dropout
    t, eps, drop = t.to(device), eps.to(device), drop.to(device)   # drawn on the CPU: the same on any device
    y = torch.where(drop, NULL_LABEL, y)                          # 20% "no label": p(x) learnt too
    x_t = q_sample(x_start, t, eps, sched.alphas_bar)             # eq. 4
    error = (model(x_t, t, y).float() - eps).square().mean(dim=(1, 2, 3))   # ||eps - eps_theta||^2 per image
    ab = sched.alphas_bar[t]
    weight = MIN_SNR_GAMMA / (ab / (1 - ab)).clamp(min=MIN_SNR_GAMMA)   # = min(SNR_t, 5) / SNR_t, 1 (not 0/0) at ab = 0
    return (weight * error).mean()


def get_lr(step, total_steps, peak):
    """Linear warm-up over the first 5% of the steps (Adam's first estimates rest
    on a few batches), then cosine decay to zero: the last steps refine, not jump."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return peak * ((step + 1) / warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))


def train_loop(model, ema, opt, x_all, y_all, sched, cfg, gen, precision, step=0):
    """Algorithm 1 on shuffled batches for cfg["epochs"] epochs, from `step` (an epoch's end) on;
    yields (step, loss) after every step, the loss left on the device (reading it waits for a GPU)."""
    batch = cfg["batch_size"]
    steps_per_epoch = math.ceil(len(x_all) / batch)
    total_steps = cfg["epochs"] * steps_per_epoch
    model.train()
    for epoch in range(step // steps_per_epoch, cfg["epochs"]):
        perm = torch.randperm(len(x_all), generator=gen).to(x_all.device)   # a fresh order every epoch
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]                   # x_start ~ q(x_start), with its digit
            with autocast(x_all.device, precision):
                loss = diffusion_loss(model, x_all[idx], y_all[idx], sched, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()                                          # a gradient step on the loss
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one bad batch cannot undo much
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total_steps, cfg["lr"])
            opt.step()
            step += 1
            decay = min(EMA_DECAY, step / (9 + step))   # ramps up, not to stay anchored at the random init
            with torch.no_grad():                       # ema = decay ema + (1 - decay) model
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            yield step, loss.detach()


# -----------------------------------------------------------------------------
# 5. Sampling: running the process backwards (DDPM)
#
# Ho et al. Algorithm 2: start from pure noise and step t = T-1, ..., 0 with
# the update of their eq. 11 (for t = 0, x_{t-1} is the clean x_start),
#
#     x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z,
#
# z ~ N(0, I). Its first term is the mean of the true posterior q(x_{t-1} | x_t,
# x_start) (eq. 6-7) at the clean image that the predicted noise implies (eq. 15),
#
#     x_start_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t).
#
# Algorithm 2 leaves sigma_t open; section 3.2 offers sigma_t^2 = beta_t or the
# posterior's variance beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
# (eq. 7). We take beta~_t, which makes DDIM with eta = 1 on all T steps this
# very sampler (section 6). As in Ho et al.'s code, x_start_hat, early on a wild
# guess, is clipped to [-1, 1], and eps replaced by the noise the clipped one
# implies (--no-clip: speckled, washed-out samples). eps_model(x_t, t) is the
# network with the digit y fixed (section 6 builds it, with guidance).


def clip_x_start(x_t, eps, ab):
    """x_start_hat (eq. 15) clipped to [-1, 1], and the noise that the clipped estimate implies."""
    x_start_hat = ((x_t - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
    return x_start_hat, (x_t - ab.sqrt() * x_start_hat) / (1 - ab).sqrt()   # eq. 4 solved for eps


@torch.no_grad()
def ddpm_sample(eps_model, sched, x, clip=True, gen=None, callback=None):
    """Ho et al. Algorithm 2, from pure noise x, over all T steps t = T-1 down to 0."""
    for t in reversed(range(sched.T)):                            # 1-2: from x ~ N(0, I), for t = T-1, ..., 0
        z = torch.randn(x.shape, generator=gen).to(x.device) if t > 0 else 0   # 3: z ~ N(0, I) but at the end
        eps = eps_model(x, t)
        if clip:                                                  #    (x_start_hat kept in [-1, 1])
            _, eps = clip_x_start(x, eps, sched.alphas_bar[t])
        x = ((x - sched.betas[t] / (1 - sched.alphas_bar[t]).sqrt() * eps) / sched.alphas[t].sqrt()
             + sched.posterior_variance[t].sqrt() * z)            # 4: x_{t-1} = ...
        if callback:
            callback(x)
    return x                                                      # 6: return x_start


# -----------------------------------------------------------------------------
# 6. Faster sampling, guidance, and which digit to draw
#
# DDIM (Song et al. 2021, eq. 12 and 16, whose alpha is our alpha_bar) reuses the
# trained network with a process that can skip steps: on a few timesteps,
# from high t to 0, with t' the next one down (x_start after t = 0, alpha_bar 1),
#
#     x_{t'} = sqrt(alpha_bar_{t'}) x_start_hat + sqrt(1 - alpha_bar_{t'} - sigma^2) eps_theta + sigma z,
#     sigma  = eta sqrt((1 - alpha_bar_{t'}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t'}).
#
# eta = 0 is deterministic, and 20 steps approach DDPM's 1000 (Song et al.
# section 5); eta = 1 on all T steps is DDPM exactly. Which timesteps and which
# eta come first, then classifier-free guidance, then which digit to draw.


# Which timesteps: at t = T-1, alpha_bar is ~0 and x_start_hat, divided by its
# root, ill-conditioned. So the steps start where the noise is sqrt((1 - alpha_bar_t)
# / alpha_bar_t) = SIGMA_MAX = 80 times the signal (Karras et al. 2022's sigma_max,
# not DDIM's sigma), evenly spaced in log SNR = log(alpha_bar_t / (1 - alpha_bar_t))
# down to t = 0 as in DPM-Solver (Lu et al. 2022): even in t, few would fall at low
# noise, where the strokes take their final shape.
def ddim_first_step(alphas_bar):
    """The last t where the noise-to-signal ratio sqrt((1 - alpha_bar_t) / alpha_bar_t) is at most SIGMA_MAX."""
    return int((alphas_bar * (1 + SIGMA_MAX ** 2) >= 1).sum()) - 1


# Which eta: eta = 0 follows the network's ODE and carries its errors into the
# image; fresh noise corrects them (Karras et al. 2022, section 4), as a short
# run's model needs, but eta = 1 throughout blurs. So eta is 1 while the image
# is nearly all noise (alpha_bar_t < NOISY_BELOW), then ETA_LATER = 0.5. The
# unconditional model saw a fifth of the training and draws worse digits
# (--uncond). It must still choose its digit, at middling noise, where steps
# even in t lie closer than in log SNR: it takes steps even in t from T-1
# (where the clip of x_start_hat tames the first), with eta = 1.
def ddim_timesteps(alphas_bar, steps, even_in_t=False):
    """`steps` distinct timesteps from ddim_first_step down to 0, evenly spaced in log SNR as near
    as integers allow, and the default eta of each: 1 while alpha_bar_t < NOISY_BELOW, then ETA_LATER.
    even_in_t (the unconditional model's): from T-1 down to 0 evenly in t, eta 1 at every step."""
    if even_in_t:
        return torch.linspace(len(alphas_bar) - 1, 0, steps, dtype=torch.float64).round().long().tolist(), [1.0] * steps
    log_snr = (alphas_bar.double() / (1 - alphas_bar.double())).log()   # falls as t grows
    first = ddim_first_step(alphas_bar)
    targets = torch.linspace(log_snr[first].item(), log_snr[0].item(), steps, dtype=torch.float64)
    ts = [int((log_snr - v).abs().argmin()) for v in targets]
    for i in reversed(range(steps - 1)):   # where the nearest timesteps coincide, the next one up
        ts[i] = min(max(ts[i], ts[i + 1] + 1), first - i)
    return ts, [1.0 if alphas_bar[t] < NOISY_BELOW else ETA_LATER for t in ts]


@torch.no_grad()
def ddim_sample(eps_model, sched, x, ts, etas, clip=True, gen=None, callback=None):
    """Song et al. eq. 12 from pure noise x, on the descending timesteps ts, with eta etas[i] at step i."""
    for i, t in enumerate(ts):
        ab = sched.alphas_bar[t]
        ab_next = sched.alphas_bar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(ab)   # 1: x_start
        eps = eps_model(x, t)
        x_start_hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()     # Ho et al. eq. 15
        if clip:                                                  # as in DDPM, so that eta = 1 equals it
            x_start_hat, eps = clip_x_start(x, eps, ab)
        sigma = etas[i] * ((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)).sqrt()                  # eq. 16
        x = ab_next.sqrt() * x_start_hat + (1 - ab_next - sigma ** 2).clamp(min=0).sqrt() * eps   # eq. 12
        if etas[i] > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=gen).to(x.device)
        if callback:
            callback(x)
    return x


# Classifier-free guidance (Ho & Salimans 2022, eq. 6) runs the network with
# the label and with "no label", and extrapolates away from the latter:
#
#     eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, none).
#
# A larger w gives more typical, more clearly-that-digit samples, at some cost
# in variety.
def guided(model, y, w, precision):
    """eps_model(x_t, t) for the digits y: the network with classifier-free
    guidance of weight w (0: none; y = NULL_LABEL: the unconditional model)."""
    def eps_model(x_t, t):
        t = torch.full((len(x_t),), t, device=x_t.device)
        with autocast(x_t.device, precision):
            if w == 0:
                return model(x_t, t, y).float()
            eps_cond, eps_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                         torch.cat([y, torch.full_like(y, NULL_LABEL)])).float().chunk(2)
        return (1 + w) * eps_cond - w * eps_uncond                # Ho & Salimans eq. 6
    return eps_model


# With no digit asked for, p(x) = sum_y p(y) p(x | y): draw a digit per sample,
# then a sample of it. The code of Dhariwal & Nichol 2021 and of Karras et al.
# 2022 also draws a label per sample, uniformly; this file uses MNIST's own
# digit frequencies as p(y): how often each occurs among its 60,000 training images.
MNIST_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)


def random_digits(n, seed, digit=None):
    """n digits drawn from p(y), MNIST's frequencies; all `digit` for a model trained on one."""
    counts = torch.tensor(MNIST_COUNTS, dtype=torch.float) if digit is None else torch.eye(NUM_CLASSES)[digit]
    return torch.multinomial(counts, n, replacement=True, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# 7. Running the method: device, precision, the sampler's settings, checkpoints.
# From here on, what a run needs around the method: a first read can skip it. A
# checkpoint is plain data (the run's config, step and EMA weights, and until the
# run ends what a resume needs), written atomically, read with weights_only.
def setup_device(name, precision):
    """(device, precision, why) for --device (auto: CUDA, then Apple's MPS, then the CPU) and --precision
    (auto: bf16 where the hardware has bf16 units, by the hardware alone, so that a command repeats)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name != "cpu" and not (torch.cuda if name == "cuda" else torch.backends.mps).is_available():
        raise UserError(f"--device {name}: PyTorch sees no such device here")   # never silently the CPU
    device = torch.device(name)
    if precision != "auto":
        return device, precision, "--precision"
    if name == "cuda":
        bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        return device, "bf16" if bf16 else "fp32", f"auto: the GPU {'has' if bf16 else 'predates'} bf16 tensor cores"
    if name == "cpu" and any(getattr(torch.cpu, f, lambda: False)()   # private: if they move, fp32
                             for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")):
        return device, "bf16", "auto: this CPU has bf16 instructions, AVX512-BF16 or AMX"
    return device, "fp32", "auto: no bf16 units here"   # MPS: bf16 autocast depends on the macOS version


class Sampler(namedtuple("Sampler", "name steps eta guidance clip even_in_t")):   # eta None: ddim_timesteps' etas
    def __str__(self):   # e.g. "DDIM 20 steps, eta 1 while alpha_bar < 0.05 then 0.5, guidance 0.25"
        eta = "" if self.name == "ddpm" else f", eta {self.eta:g}" if self.eta is not None else \
            " even in t, eta 1" if self.even_in_t else f", eta 1 while alpha_bar < {NOISY_BELOW:g} then {ETA_LATER:g}"
        return f"{self.name.upper()} {self.steps} steps{eta}" + (f", guidance {self.guidance:g}" if self.guidance else "")


def choose_sampler(labelled, sched, name=None, steps=None, eta=None, guidance=None, clip=True):
    """The sampling defaults, decided here only: DDIM in STEPS steps; guided, eta as ddim_timesteps
    gives it (1 on the noisiest steps, ETA_LATER after), for a digit; even in t, eta 1, for no digit."""
    name = name or "ddim"
    if name == "ddpm" and (eta is not None or steps is not None):
        raise UserError("--eta and --steps are DDIM's; DDPM always takes all T steps with eta 1")
    if guidance and not labelled:
        raise UserError("--guidance needs a digit to guide towards; the unconditional model has none")
    guidance = (GUIDANCE if labelled else 0.0) if guidance is None else guidance
    most = sched.T if name == "ddpm" or not labelled else ddim_first_step(sched.alphas_bar) + 1
    steps = most if name == "ddpm" else min(STEPS, most) if steps is None else steps
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"--eta {eta}: must be between 0 and 1")
    if not 1 <= steps <= most:
        raise UserError(f"--steps {steps}: this model takes 1 to {most} steps")
    if not 0 <= guidance <= 100:   # also refuses nan
        raise UserError(f"--guidance {guidance}: must be a number from 0 to 100")
    return Sampler(name, steps, eta, guidance, clip, even_in_t=not labelled)


def generate(model, sched, labels, sampler, seed=0, batch_size=100, precision="fp32", callback=None):
    """len(labels) images (NULL_LABEL: none) in [-1, 1], the same on any device; callback(x_t): batch 1."""
    if sampler.name == "ddim":
        ts, etas = ddim_timesteps(sched.alphas_bar, sampler.steps, sampler.even_in_t)
        etas = etas if sampler.eta is None else [sampler.eta] * len(ts)
    device = next(model.parameters()).device
    sched, gen, out = sched.to(device), torch.Generator().manual_seed(seed), []   # one generator: a seed fixes all
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        x = torch.randn((len(y), 1, 28, 28), generator=gen).to(device)   # pure noise
        if cb := callback if start == 0 else None:
            cb(x)
        eps_model = guided(model, y, sampler.guidance, precision)
        if sampler.name == "ddpm":
            x = ddpm_sample(eps_model, sched, x, sampler.clip, gen, cb)
        else:
            x = ddim_sample(eps_model, sched, x, ts, etas, sampler.clip, gen, cb)
        if not torch.isfinite(x).all():   # would be a black picture, or a failure inside the FID
            raise UserError("some samples came out NaN or infinite: the model or its sampling diverged")
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


INT_RANGES = dict(timesteps=(2, 100_000), epochs=(1, 10 ** 6), batch_size=(1, 10 ** 6), seed=(0, 2 ** 63 - 1),
                  digit=(0, 9), limit=(1, 10 ** 9))   # epochs, digit and limit may also be None: the default


def config_problem(cfg):
    """What is wrong with a run's config, as the flag that sets it and what it must be; None if nothing."""
    if not isinstance(cfg, dict) or not set(TRAIN) <= set(cfg):
        return f"it is not a dict with {', '.join(TRAIN)}"
    ok = {"channels": type(cfg["channels"]) is list and 1 <= len(cfg["channels"]) <= 3
          and all(type(c) is int and 8 <= c <= 4096 and c % 8 == 0 for c in cfg["channels"]),
          "schedule": cfg["schedule"] in ("cosine", "linear"), "lr": type(cfg["lr"]) is float and 0 < cfg["lr"] <= 1}
    ok |= {k: (type(cfg[k]) is int and lo <= cfg[k] <= hi) or (cfg[k] is None and k in ("epochs", "digit", "limit"))
           for k, (lo, hi) in INT_RANGES.items()}
    need = dict(channels="1 to 3 widths (28 pixels halve to 14 and 7, no further), each a multiple of 8 up to 4096",
                schedule="cosine or linear", lr="above 0 and at most 1",
                **{k: f"{lo:,} to {hi:,}" for k, (lo, hi) in INT_RANGES.items()})
    return next((f"--{k.replace('_', '-')} {cfg[k]}: must be {need[k]}" for k in TRAIN if not ok[k]), None)


def atomic_save(obj, path):
    """A temporary file beside `path`, renamed over it: a save that dies halfway leaves the last one whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """A checkpoint as plain data, and the U-Net it describes, with its EMA weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one with 'python ddpm_mnist.py train' or pass --ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "ddpm_mnist" or "ema" not in ckpt:
        raise UserError(f"{path} is not a ddpm_mnist checkpoint")
    if problem := config_problem(ckpt.get("config")):
        raise UserError(f"{path}: its config is damaged ({problem})")
    try:
        model = UNet(ckpt["config"]["channels"])
        model.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"{path}: its weights do not fit the U-Net its config describes; "
                        "the file is damaged or from another version") from None
    if not all(torch.isfinite(p).all() for p in model.state_dict().values()):   # black pictures, a broken FID
        raise UserError(f"{path}: some of its weights are NaN or infinite; the file is damaged")
    return ckpt, model


# -----------------------------------------------------------------------------
# 8. Pictures, in 8-bit grayscale, and evaluation: how good are the samples?
def to_uint8(x):
    # Clamped, since a cast to uint8 wraps (256 -> 0); rounded, since truncating darkens.
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(x, nrow):
    """[N, 1, 28, 28] in [-1, 1] -> a PIL grayscale grid, `nrow` images per row."""
    from torchvision.utils import make_grid
    # White gutters: black ones would merge the white-on-black digits' tiles.
    return Image.fromarray(make_grid(to_uint8(x.cpu()), nrow=nrow, padding=2, pad_value=255)[0].numpy())


def save_image(image, path, quiet=False, **options):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    quiet or print(f"wrote {path}", flush=True)


def save_each(x, out_dir):
    """Every image as its own grayscale PNG: DIR/00000.png, DIR/00001.png, ..."""
    for i, img in enumerate(to_uint8(x)):
        save_image(Image.fromarray(img[0].numpy()), Path(out_dir) / f"{i:05d}.png", quiet=True)
    print(f"wrote {len(x)} PNGs to {out_dir}/")


# The Frechet Inception Distance (Heusel et al. 2017) fits a Gaussian to the
# features of real and of generated images and measures their distance,
# |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)). Here the features are the
# 128-d penultimate layer of a small MNIST classifier (Inception's need a download,
# and see digits as blobs): NOT comparable with FIDs in papers. Compare them with
# each other and with the "floor", as many real training images (of the same
# digits, where samples have labels) scored alike, as FID is biased up for small n.
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        def conv(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
        self.body = nn.Sequential(conv(1, 32), conv(32, 32), nn.MaxPool2d(2),
                                  conv(32, 64), conv(64, 64), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, NUM_CLASSES))   # logits: head(body(x))


@torch.no_grad()
def classify(clf, x, batch_size=1000):
    """Features [N, 128] (float64, on the CPU) and predicted digits [N]."""
    dev = next(clf.eval().parameters()).device
    # To the CPU before float64: Apple's GPUs have no float64.
    feats = torch.cat([clf.body(x[i:i + batch_size].to(dev)).cpu().double() for i in range(0, len(x), batch_size)])
    return feats, clf.head(feats.float().to(dev)).argmax(1).cpu()


def load_or_train_classifier(path, data_dir, device, precision, epochs=3, batch_size=128, seed=0):
    """The classifier cached at `path` (weights_only), or a new one: MNIST, shifted up to 2 pixels."""
    if Path(path).is_file():
        try:
            clf = Classifier()
            clf.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["classifier"])
        except Exception:
            raise UserError(f"{path} is not a ddpm_mnist classifier; give another --classifier") from None
        print(f"classifier: {path}")
        return clf.to(device).eval()
    print(f"classifier: training one on MNIST (cached at {path})")
    x, y = load_mnist(data_dir, train=True)
    torch.manual_seed(seed)
    clf = Classifier().to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * math.ceil(len(x) / batch_size))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(F.pad(x[idx], (2, 2, 2, 2), value=-1), (dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]
            with autocast(device, precision):
                loss = F.cross_entropy(clf.head(clf.body(xb.to(device))).float(), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    atomic_save({"classifier": clf.state_dict()}, path)
    return clf.eval()


def fid(feats_a, feats_b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), symmetric in a and b, in float64 (it
    subtracts large traces); tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), symmetric."""
    mu_a, mu_b = feats_a.double().mean(0), feats_b.double().mean(0)
    cov_a, cov_b = torch.cov(feats_a.double().T), torch.cov(feats_b.double().T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T                       # S_a^(1/2)
    eig = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0)   # their square roots sum to the trace
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eig.sqrt().sum())


def same_digits(y_real, labels, gen):
    """Random real images with the digits of `labels`: as many 0s as it has, ... (fewer if MNIST runs out)."""
    perm = torch.randperm(len(y_real), generator=gen)
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    return torch.cat([perm[y_real[perm] == d][:int(counts[d])] for d in range(NUM_CLASSES)])


# -----------------------------------------------------------------------------
# 9. The command line. A user's mistake is one line and a failing exit, found
# before the work starts (a NaN loss, or a run that takes --ckpt meanwhile: as it runs).

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
MAX_SAMPLES = 50_000   # --n; evaluate's floor needs as many real images of each digit


def check_writable(path, flag, types=IMAGE_TYPES):
    """Fail now, not after an hour of work, if file `path` (of one of `types`) could not be written; creates nothing."""
    if path is None:
        return None
    path = Path(path)
    if types and path.suffix.lower() not in types:
        raise UserError(f"{flag} {path}: the file name must end in {' or '.join(types[:2])}")
    if path.is_dir():
        raise UserError(f"{flag} {path}: it is a folder")
    if not (folder := next(p for p in path.parents if p.exists())).is_dir():   # the nearest one that is there
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def check_range(value, lo, hi, flag):
    if not lo <= value <= hi:
        raise UserError(f"{flag} {value}: must be {lo:,} to {hi:,}")


def cmd_train(args):
    ckpt_path = check_writable(args.ckpt, "--ckpt", types=None)
    check_writable(ckpt_path.with_name(f"{ckpt_path.stem}_epoch01.png"), "--ckpt (its grids)")
    # The config holds all that defines a run: the defaults and the flags given,
    # or a resumed run's own, which a flag that contradicts it may not change.
    flags = {k: getattr(args, k) for k in TRAIN if getattr(args, k) is not None}
    cfg, ckpt = {**TRAIN, **flags}, None
    if not args.resume:
        if ckpt_path.exists():   # it may be hours of work: never replaced unasked
            raise UserError(f"{ckpt_path} exists: continue it with --resume, or give another --ckpt")
        if problem := config_problem(cfg):
            raise UserError(problem)
    else:
        ckpt, _ = load_checkpoint(ckpt_path)
        cfg = ckpt["config"]
        if clashes := [f"--{k.replace('_', '-')} {v} (it has {cfg[k]})" for k, v in flags.items() if cfg[k] != v]:
            raise UserError(f"--resume continues {ckpt_path} with its own config, but you gave "
                            f"{', '.join(clashes)}; drop those flags, or start a new run with another --ckpt")
        if "optimizer" not in ckpt:
            return print(f"{ckpt_path} is a finished run: nothing to resume")
    device, precision, why = setup_device(args.device, args.precision)
    torch.manual_seed(cfg["seed"])                       # the initial weights
    model = UNet(cfg["channels"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)   # no decay: Adam, in effect
    gen, step = torch.Generator().manual_seed(cfg["seed"]), 0   # every random draw of training
    if ckpt:
        try:
            for obj, key in ((model, "model"), (ema, "ema"), (opt, "optimizer")):
                obj.load_state_dict(ckpt[key])
            gen.set_state(ckpt["rng"])
            step = int(ckpt["step"])
        except (RuntimeError, TypeError, ValueError, KeyError) as e:
            raise UserError(f"{ckpt_path} cannot be resumed: its training state is damaged ({type(e).__name__} {e})") from None
    for stale in [p for p in ckpt_path.parent.glob("*.tmp") if p.name.startswith(ckpt_path.name + ".")]:
        stale.unlink()                                   # left by a save that was killed
    x_all, y_all = load_mnist(args.data_dir, True, cfg["digit"], cfg["limit"])
    x_all, y_all = x_all.to(device), y_all.to(device)
    cfg["epochs"] = cfg["epochs"] or math.ceil(TRAIN_IMAGES / len(x_all))   # steps matter more than epochs
    sched = make_schedule(cfg["schedule"], cfg["timesteps"])
    per_epoch = math.ceil(len(x_all) / cfg["batch_size"])
    total = cfg["epochs"] * per_epoch
    print(f"U-Net {sum(p.numel() for p in model.parameters()):,} parameters | {len(x_all):,} images | "
          f"{device} {precision} ({why}) | {cfg['epochs']} epochs x {per_epoch} steps of {cfg['batch_size']}")
    t_start, last_print, first, losses, saved = time.time(), 0.0, step, [], ckpt is not None
    for step, loss in train_loop(model, ema, opt, x_all, y_all, sched.to(device), cfg, gen, precision, step):
        losses.append(loss)
        if time.time() - t_start - last_print > 10 or step % per_epoch == 0:
            # The losses since the last line, read at once: a NaN stops the run before a save.
            losses = torch.stack(losses)
            if len(bad := (~torch.isfinite(losses)).nonzero()):
                where = f"the last good checkpoint is {ckpt_path}" if saved else "no checkpoint was saved"
                raise UserError(f"the loss became {losses[int(bad[0])].item()} at step "
                                f"{step - len(losses) + int(bad[0]) + 1}; try a lower --lr ({where})")
            last_print, rate = time.time() - t_start, (step - first) * cfg["batch_size"] / (time.time() - t_start)
            left = (total - step) * cfg["batch_size"] / rate / 60
            print(f"epoch {math.ceil(step / per_epoch)}/{cfg['epochs']}  step {step}/{total}  loss {losses.mean():.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {rate:.0f} img/s  left {left:.1f} min", flush=True)
            losses = []
        if step % (math.ceil(cfg["epochs"] / 10) * per_epoch) and step < total:
            continue   # saves after every epoch, or every tenth of a longer run
        # What a resume needs; the last save, only the EMA weights in fp16. Then a grid, as `sample` draws.
        state = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), rng=gen.get_state())
        if step == total:
            state = dict(ema={k: v.half() for k, v in ema.state_dict().items()})
        if not saved and ckpt_path.exists():   # another run took the name meanwhile: never replace it
            raise UserError(f"{ckpt_path} appeared while this run trained; not replaced: give another --ckpt")
        atomic_save(dict(format="ddpm_mnist", config=cfg, step=step, **state), ckpt_path)
        saved = True
        print(f"saved {ckpt_path}")
        x = generate(ema.eval(), sched, random_digits(64, 0, cfg["digit"]), choose_sampler(True, sched), precision=precision)
        save_image(grid_image(x, nrow=8), ckpt_path.with_name(f"{ckpt_path.stem}_epoch{step // per_epoch:02d}.png"))
    print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min")


PROMPTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", *"0123456789")


def parse_prompt(text):
    """'7', 'seven', ' SEVEN ' -> 7; anything else is a UserError."""
    if text.strip().lower() in PROMPTS:
        return PROMPTS.index(text.strip().lower()) % 10
    raise UserError(f"unknown prompt {text.strip()!r}: use a digit 0-9 or a number word, zero to nine")


def load_model(args, labelled):
    """The model (--ckpt, else ./ddpm_mnist.pt, else the shipped one), config, schedule, sampler, precision."""
    check_range(args.seed, 0, 2 ** 63 - 1, "--seed")
    path = Path(args.ckpt or (CKPT if Path(CKPT).is_file() else SHIPPED))
    ckpt, model = load_checkpoint(path)
    sched = make_schedule(ckpt["config"]["schedule"], ckpt["config"]["timesteps"])
    sampler = choose_sampler(labelled, sched, args.sampler, args.steps, args.eta, args.guidance, not args.no_clip)
    device, precision, why = setup_device(args.device, args.precision)
    print(f"checkpoint: {path} (trained {ckpt.get('step', '?')} steps) | {device} {precision} ({why})")
    return model.to(device).eval(), sched, ckpt["config"], sampler, precision


def pick_labels(args, n, cfg):
    """The digits to draw (NULL_LABEL: none) and how to say so; a one-digit model knows only its digit."""
    if (one := cfg["digit"]) is not None and (getattr(args, "per_class", None) or getattr(args, "conditional", False)
                                              or getattr(args, "digit", None) not in (None, one)):
        raise UserError(f"this model learnt only {one}s (train --digit {one}): ask for {one}s or for none")
    if getattr(args, "per_class", None):
        return torch.arange(NUM_CLASSES).repeat_interleave(args.per_class), f"{args.per_class} per digit"
    if getattr(args, "digit", None) is not None:
        return torch.full((n,), args.digit), f"digit {args.digit}"
    if getattr(args, "conditional", False):
        return torch.arange(n) % NUM_CLASSES, "an equal number of each digit"
    if args.uncond:
        return torch.full((n,), NULL_LABEL), "the unconditional model"
    mnist = "random digits, drawn with MNIST's frequencies"
    return random_digits(n, args.seed, cfg["digit"]), mnist if cfg["digit"] is None else f"{cfg['digit']}s, its one digit"


def cmd_sample(args):
    if args.per_class is not None and args.n is not None:
        raise UserError("--per-class K draws 10 K samples: drop --n")
    n, k = 64 if args.n is None else args.n, args.per_class
    check_range(n if k is None else k, 1, MAX_SAMPLES // (1 if k is None else 10), "--n" if k is None else "--per-class")
    args.digit = parse_prompt(args.prompt) if args.prompt is not None else args.digit
    out = Path(args.out or ("samples/prompt_{digit}.png" if args.interactive else "sample.png"))
    if args.interactive:
        if args.gif or args.trajectory or args.out_dir:
            raise UserError("--interactive writes one grid per prompt: drop --gif, --trajectory and --out-dir")
        if "{digit}" in str(out.parent):
            raise UserError(f"--out {out}: {{digit}} belongs in the file name, not in a folder")
        if "{digit}" not in out.name:   # a grid per prompt: the digit in the name
            out = out.with_name(out.stem + "_{digit}" + out.suffix)
        if sys.stdin is None or sys.stdin.closed:
            raise UserError("--interactive reads prompts from standard input, which is closed")
    elif "{digit}" in str(out):
        raise UserError(f"--out {out}: {{digit}} is filled in only with --interactive")
    files = {"--out": Path(str(out).replace("{digit}", "0")), "--trajectory": args.trajectory, "--gif": args.gif}
    for flag, path in (*files.items(), ("--out-dir", args.out_dir and Path(args.out_dir) / "00000.png")):
        check_writable(path, flag, (".gif",) if flag == "--gif" else IMAGE_TYPES)
    if len(paths := [Path(p).resolve() for p in files.values() if p]) > len(set(paths)):
        raise UserError("--out, --trajectory and --gif each need a file of their own")
    model, sched, cfg, sampler, precision = load_model(args, labelled=not args.uncond)
    while args.interactive:   # a grid per line of stdin until an empty line; a bad word is reported and skipped
        if sys.stdin.isatty():
            print("prompt (a digit or a number word; empty line to quit)> ", end="", flush=True)
        if not (line := sys.stdin.readline()).strip():
            return
        try:
            args.digit = parse_prompt(line)
            labels, _ = pick_labels(args, n, cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        x = generate(model, sched, labels, sampler, args.seed, precision=precision)
        save_image(grid_image(x, math.ceil(math.sqrt(n))), str(out).replace("{digit}", str(args.digit)))
    labels, what = pick_labels(args, n, cfg)
    nrow = args.per_class or math.ceil(math.sqrt(n))
    frames = []   # every x_t of the first batch (at most 64 images), for --trajectory and --gif
    keep = (lambda x_t: frames.append(x_t[:64].clamp(-1, 1).cpu())) if args.trajectory or args.gif else None
    t0 = time.time()
    x = generate(model, sched, labels, sampler, args.seed, precision=precision, callback=keep)
    print(f"{len(x)} samples ({what}; {sampler}) in {time.time() - t0:.1f} s")
    save_image(grid_image(x, nrow), out)
    args.out_dir and save_each(x, args.out_dir)
    if args.trajectory:   # a row per sample (8 at most), 10 snapshots from noise to digit
        picks = torch.linspace(0, len(frames) - 1, 10).round().long().tolist()
        save_image(grid_image(torch.stack([frames[j][:8] for j in picks], dim=1).flatten(0, 1), nrow=10), args.trajectory)
    if args.gif:   # 60 frames at most (DDPM has 1000), 80 ms each, and the final grid for 2 s
        grids = [grid_image(frames[j], min(nrow, len(frames[0])))
                 for j in torch.linspace(0, len(frames) - 1, min(60, len(frames))).round().long().tolist()]
        save_image(grids[0], args.gif, save_all=True, append_images=grids[1:], loop=0,
                   duration=[80] * (len(grids) - 1) + [2000])


def cmd_forward(args):
    check_range(args.n, 1, 64, "--n")
    out = check_writable(args.out, "--out")
    # Rows of x_t at 11 t from 0 to T-1, the linear schedule's above the cosine
    # one's, with the same noise: they differ only in how fast alpha_bar falls.
    x_start = load_mnist(args.data_dir, limit=args.n)[0]
    eps = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(0, TRAIN["timesteps"] - 1, 11).round().long()
    rows = [torch.cat([q_sample(x_start[i:i + 1], ts, eps[i:i + 1], make_schedule(name, TRAIN["timesteps"]).alphas_bar)
                       for i in range(len(x_start))]) for name in ("linear", "cosine")]
    save_image(grid_image(torch.cat([rows[0], torch.ones(11, 1, 28, 28), rows[1]]), nrow=11), out)   # white row between


def cmd_evaluate(args):
    check_range(args.n, 2, MAX_SAMPLES, "--n")   # FID needs a covariance
    check_writable(args.classifier, "--classifier", types=None)
    check_writable(args.out_dir and Path(args.out_dir) / "00000.png", "--out-dir")
    model, sched, cfg, sampler, precision = load_model(args, labelled=not args.uncond)
    # 1. the labels, as `sample` draws them: random digits, an equal number of each, or none
    labels, what = pick_labels(args, args.n, cfg)
    # 2. the judge: a classifier, and the features of the real test images
    x_test, y_test = load_mnist(args.data_dir, False, cfg["digit"])   # a one-digit model: that digit's
    clf = load_or_train_classifier(args.classifier, args.data_dir, next(model.parameters()).device, precision)
    test_feats, test_pred = classify(clf, x_test)
    print(f"classifier accuracy on the {len(x_test)} test images: {100 * (test_pred == y_test).float().mean().item():.2f}%")
    # 3. the floor: real training images (the test images would score 0)
    x_real, y_real = load_mnist(args.data_dir, True, cfg["digit"])     # of a one-digit model: that digit's
    gen = torch.Generator().manual_seed(args.seed)
    real = torch.randperm(len(x_real), generator=gen)[:args.n] if args.uncond else same_digits(y_real, labels, gen)
    floor = fid(classify(clf, x_real[real])[0], test_feats)
    # 4. the samples, timed, and their verdicts
    t0 = time.time()
    x = generate(model, sched, labels, sampler, args.seed, precision=precision)
    print(f"samples: {args.n}, {what}; {sampler}; seed {args.seed}; {time.time() - t0:.1f} s")
    feats, pred = classify(clf, x)
    score = fid(feats, test_feats)
    print(f"FID (classifier features, against the {len(x_test)} test images): {score:.3f}")
    print(f"floor (FID of {len(real)} real training images{'' if args.uncond else ' of the same digits'}): "
          f"{floor:.3f}   ratio {score / max(floor, 1e-12):.2f}x")
    if not args.uncond:
        print(f"accuracy (the digit asked for): {100 * (pred == labels).float().mean().item():.2f}%")
    counts = torch.bincount(pred, minlength=NUM_CLASSES).tolist()
    print("class histogram: " + "  ".join(f"{d}:{100 * c / args.n:.1f}%" for d, c in enumerate(counts)))
    args.out_dir and save_each(x, args.out_dir)


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    def widths(text):   # "32,64,128" -> [32, 64, 128]; argparse reports a ValueError in one line
        return [int(c) for c in text.split(",")]
    p = Parser(prog="ddpm_mnist.py", description="A denoising diffusion model on MNIST, in one file.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser("train", help="train a model (never over an existing --ckpt)")
    for key, kind in (("channels", widths), ("schedule", str), ("timesteps", int), ("epochs", int),
                      ("batch_size", int), ("lr", float), ("seed", int), ("digit", int), ("limit", int)):
        t.add_argument("--" + key.replace("_", "-"), type=kind, help="default " + {"channels": "32,64,128", "digit": "all",
                       "limit": "all", "epochs": f"enough for {TRAIN_IMAGES:,} images"}.get(key, str(TRAIN[key])))
    t.add_argument("--ckpt", default=CKPT, help="the checkpoint, written every epoch (every tenth of a run over 10 epochs)")
    t.add_argument("--resume", action="store_true", help="continue --ckpt with its own config")
    s = sub.add_parser("sample", help="draw digits from a trained model")
    s.add_argument("--n", type=int, help="how many samples (default 64)")
    s.add_argument("--out", help="the grid (default sample.png; samples/prompt_{digit}.png with --interactive)")
    s.add_argument("--trajectory", metavar="FILE.png", help="also draw the reverse process")
    s.add_argument("--gif", metavar="FILE.gif", help="also animate the reverse process")
    f = sub.add_parser("forward", help="picture the forward (noising) process; no model needed")
    f.add_argument("--n", type=int, default=4, help="how many training images")
    f.add_argument("--out", default="forward.png")
    e = sub.add_parser("evaluate", help="FID and digit accuracy of the samples")
    e.add_argument("--n", type=int, default=10000)
    e.add_argument("--classifier", default="mnist_classifier.pt", help="cached here after its first training")
    for sp in (t, f, e):
        sp.add_argument("--data-dir", default="./data", help="holds MNIST/raw/; downloaded there when missing")
    for sp in (s, e):
        sp.add_argument("--ckpt", help=f"default ./{CKPT} if it exists, else the shipped samples/ddpm_mnist.pt")
        sp.add_argument("--sampler", choices=["ddim", "ddpm"], help="default ddim; ddpm takes all T steps")
        sp.add_argument("--steps", type=int, help=f"DDIM steps (default {STEPS})")
        sp.add_argument("--eta", type=float, help="DDIM's noise at every step, 0..1 (default: 1 while "
                        f"alpha_bar < {NOISY_BELOW:g}, then {ETA_LATER:g}; 1 with --uncond)")
        sp.add_argument("--guidance", type=float, help=f"classifier-free guidance w (default {GUIDANCE})")
        sp.add_argument("--no-clip", action="store_true", help="do not clip the x_start estimate to [-1, 1]")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--out-dir", help="also write every sample as DIR/00000.png, ...")
        labels = sp.add_mutually_exclusive_group()
        labels.add_argument("--uncond", action="store_true", help="the unconditional model: no label, no guidance")
        if sp is s:
            labels.add_argument("--digit", type=int, choices=range(10), metavar="D", help="default: random digits")
            labels.add_argument("--prompt", help="a digit 0-9 or a number word, zero to nine")
            labels.add_argument("--per-class", type=int, metavar="K", help="a row of K samples per digit")
            labels.add_argument("--interactive", action="store_true", help="read prompts from stdin, a grid each")
        else:
            labels.add_argument("--conditional", action="store_true", help="an equal number of each digit")
    for sp in (t, s, e):
        sp.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
        sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where the GPU or CPU has bf16 units, else fp32")
    return p


def main(argv=None):
    # A UserError is the user's to fix: one line, exit 1. Anything else is a bug
    # in this file and keeps its traceback, which is what a bug report needs.
    args = build_parser().parse_args(argv)
    try:
        dict(train=cmd_train, sample=cmd_sample, forward=cmd_forward, evaluate=cmd_evaluate)[args.command](args)
        sys.stdout.flush()   # here, so that a reader who left (`| head`) is noticed inside the try
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:   # the reader of our output left: stop quietly, and silence the final flush
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
