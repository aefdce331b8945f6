#!/usr/bin/env python3
"""ddpm_mnist.py: a denoising diffusion model (DDPM) on MNIST, in one file.

The idea: destroy images with Gaussian noise, step by step, and train a
network to tell, at any step, which noise was added (here through the
velocity v, a mix of noise and image). To generate, start from pure
noise and remove the predicted noise step by step.

Sections 1-6 are the method, in the order you would learn it: the data,
the forward process, the U-Net, the loss and the training loop, the
DDPM sampler, then DDIM and guidance. Sections 7-9 are what a run needs
around it (devices, checkpoints, pictures, evaluation, the command
line): a first read can skip them. "Ho et al." is the DDPM paper (Ho,
Jain & Abbeel 2020); equation numbers are its own unless said.
"""

import argparse
import contextlib
import copy
import math
import os
import struct
import sys
import time
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# The defaults of a training run, here only; each but the schedule and
# T is a flag of `train`, each explained in its section. Section 4
# holds the loss's constants, section 6 the sampler's.
TRAIN = dict(
    channels=[32, 64, 128],  # the U-Net's widths at 28, 14 and 7 pixels
    schedule="cosine",       # how fast the noise grows: cosine or linear
    timesteps=1000,          # T, the number of noising steps
    epochs=None,             # None: enough epochs for TRAIN_IMAGES images
    batch_size=64,           # images per step; Muon's work is per step
    lr=2e-3,                 # the peak learning rate, Muon's and Adam's
    seed=0,                  # the initial weights and every random draw
    digit=None,              # train on one digit only
    limit=None,              # keep the first N images (after `digit`)
)
TRAIN_IMAGES = 300_000       # a default run: 5 epochs of MNIST


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 1."""


# -----------------------------------------------------------------------------
# 1. Data
#
# MNIST: 60,000 training and 10,000 test images of handwritten
# digits, 28x28 pixels, grayscale, each labelled 0-9. Diffusion mixes
# images with Gaussian noise of unit variance, so pixels must live on
# a comparable scale, centred on zero (Ho et al. section 3.3):
#
#     x = 2 * pixel / 255 - 1, from [0, 255] to [-1, 1].
#
# The set is small: it is decoded once into one tensor, and batches
# are random rows of it. The files are in the IDX format: a magic
# number (bytes 0, 0, then 8 for "unsigned bytes", then the number of
# dimensions, 1 + len(shape)), each size as a big-endian 32-bit integer,
# then the bytes.
def read_idx(path, shape):
    """An IDX file of N items of `shape`, as uint8 [N, *shape]."""
    data = path.read_bytes()
    n = int.from_bytes(data[4:8], "big")
    head = struct.pack(f">{2 + len(shape)}I", 0x801 + len(shape), n, *shape)
    if not data.startswith(head) or len(data) != len(head) + n * math.prod(shape):
        raise UserError(f"{path} is damaged, or not MNIST's: replace it")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=len(head)).view(n, *shape)


def load_mnist(data_dir, train=True, digit=None, limit=None):
    """Images [N, 1, 28, 28] in [-1, 1] and labels [N], from
    data_dir/MNIST/raw (downloaded there if missing)."""
    raw = Path(data_dir) / "MNIST" / "raw"
    split = "train" if train else "t10k"
    images = raw / f"{split}-images-idx3-ubyte"
    labels = raw / f"{split}-labels-idx1-ubyte"
    if not (images.is_file() and labels.is_file()):
        from torchvision import datasets
        try:
            datasets.MNIST(data_dir, download=True)
        except Exception as e:
            raise UserError(f"MNIST is not in {raw} and could not be downloaded "
                            f"({type(e).__name__}): put the *-ubyte files there") from None
    x = read_idx(images, (28, 28))
    y = read_idx(labels, ()).long()
    if digit is not None:
        x, y = x[y == digit], y[y == digit]
    # the first `limit` (None: all), after the digit filter
    x, y = x[:limit], y[:limit]
    return x.unsqueeze(1).float() / 127.5 - 1, y


# -----------------------------------------------------------------------------
# 2. The forward process and the noise schedules
#
# Timesteps are 0-based, t in {0, ..., T-1}, as arrays are: x_t is the
# image after t + 1 steps of noise, the paper's x_{t+1}, and beta_t,
# alpha_t, alpha_bar_t shift by one likewise. The clean image, the
# paper's x_0, is x_start (the name in Ho et al.'s code), also written
# x_{-1} where a formula steps from x_t to x_{t-1}.
#
# The forward process destroys x_start with Gaussian noise in T steps,
# each keeping sqrt(1 - beta_t) of the signal (eq. 2):
#
#     q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I).
#
# Gaussians compose, so any step can be reached at once (eq. 4), with
# alpha_t = 1 - beta_t and alpha_bar_t = prod_{s <= t} alpha_s, the
# share of the signal's variance left, falling from ~1 to ~0:
#
#     x_t = sqrt(alpha_bar_t) x_start + sqrt(1 - alpha_bar_t) eps,
#     eps ~ N(0, I).
#
# The schedule is how fast alpha_bar falls. Linear: beta_t from 1e-4
# to 0.02 (Ho et al. section 4); on small images its last third of
# steps is almost pure noise. Cosine (Nichol & Dhariwal 2021, eq. 17):
# alpha_bar_t = f(t + 1) / f(0), f(t) = cos^2((t/T + 0.008) / 1.008 * pi/2),
# beta clipped at 0.999; alpha_bar falls slowly at both ends.
class Schedule(namedtuple("Schedule", "betas alphas alphas_bar posterior_variance")):
    @property
    def T(self):
        return len(self.betas)

    def to(self, device):
        return Schedule(*(v.to(device) for v in self))


def make_schedule(name, T):
    """Every per-timestep constant the method uses, indexed by t."""
    if name == "linear":
        # scaled by 1000 / T: as much noise for any T (as in
        # Nichol & Dhariwal's code)
        betas = torch.linspace(0.1 / T, 20 / T, T, dtype=torch.float64)
    else:
        # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} = 1 - f(t + 1) / f(t)
        s = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    betas = betas.clamp(max=0.999)
    # alpha_t = 1 - beta_t
    alphas = 1 - betas
    # alpha_bar_t = prod_{s <= t} alpha_s
    alphas_bar = torch.cumprod(alphas, dim=0)
    # alpha_bar before the first step is 1: the clean image
    alphas_bar_prev = F.pad(alphas_bar[:-1], (1, 0), value=1.0)
    # beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t), used by
    # section 5: the variance of q(x_{t-1} | x_t, x_start) (eq. 7)
    posterior_variance = betas * (1 - alphas_bar_prev) / (1 - alphas_bar)
    # float64 above, as alpha_bar gets tiny; float32 for the device
    # (Apple's GPUs have no float64), ample for the samplers.
    tensors = (betas, alphas, alphas_bar, posterior_variance)
    return Schedule(*(v.float() for v in tensors))


def q_sample(x_start, t, eps, alphas_bar):
    """x_t ~ q(x_t | x_start) (eq. 4), a timestep t per image."""
    alpha_bar = alphas_bar[t].view(-1, 1, 1, 1)
    # x_t = sqrt(alpha_bar_t) x_start + sqrt(1 - alpha_bar_t) eps
    return alpha_bar.sqrt() * x_start + (1 - alpha_bar).sqrt() * eps


# Three quantities follow from eq. 4. Solved for x_start, it gives the
# clean image that a guess of the noise implies (eq. 15):
#
#     x_start_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).
#
# The signal-to-noise ratio of x_t is SNR_t = alpha_bar_t / (1 -
# alpha_bar_t): under the cosine schedule, ~2e4 at t = 0, ~2e-9 at T-1.
#
# And the velocity (Salimans & Ho 2022, section 4) mixes the noise and
# the clean image, the noise where x_t is nearly clean and minus the
# image where x_t is nearly all noise; with x_t, it gives back both:
#
#     v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_start,
#     eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t,
#     x_start = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v.
def predict_x_start(x_t, eps, alpha_bar):
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def snr(alpha_bar):
    return alpha_bar / (1 - alpha_bar)


# -----------------------------------------------------------------------------
# 3. The network: a compact U-Net v_theta(x_t, t, y)
#
# It sees a noisy image x_t, its timestep t and its digit y, and
# predicts the velocity v of x_t, from which the noise eps and the
# clean image follow: an output shaped like its input, so a U-Net
# (Ronneberger et al. 2015, as in Ho et al. appendix B):
#
#   28x28 -down-> 14x14 -down-> 7x7 (+ self-attention) -up-> 14 -up-> 28
#
# A residual block per level; skip connections carry each level's
# detail from the way down to the way up. t (a sinusoidal embedding,
# like a Transformer's positions) and y enter every block as a scale
# s and a shift b after a GroupNorm (FiLM, Perez et al. 2018; AdaGN in
# Dhariwal & Nichol 2021):
#
#     h -> GroupNorm(h) * (1 + s(t, y)) + b(t, y).
#
# y has 11 embeddings: one per digit, and one for "no label", shown in
# training 20% of the time, so that one network learns both p(x | y)
# and p(x); section 6 combines the two.
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES   # the extra "no label" class


def timestep_embedding(t, dim):
    """Integer timesteps [B] -> [B, dim]: sines and cosines of t f_k."""
    # Near t get near vectors, far t different ones (a raw t would be
    # badly scaled). f_k = 10000^(-k / half), k = 0, ..., half - 1
    half = dim // 2
    k = torch.arange(half, device=t.device)
    freqs = torch.exp(-math.log(10000) * k / half)
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], 1)


def zero_init(module):
    # The last layer of each residual branch starts at zero: every block
    # starts as its skip path, and the untrained U-Net outputs 0 (as in
    # Ho et al.'s code).
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """skip(x) + conv(silu(FiLM(conv(silu(norm(x)))))); the skip is the
    identity, or a 1x1 conv where the width changes."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        # GroupNorm, not BatchNorm: a sample does not see its batch
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity()
        if c_in != c_out:
            self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        s, b = self.film(F.silu(emb))[:, :, None, None].chunk(2, 1)
        # h -> GroupNorm(h) (1 + s) + b: a FiLM of zero leaves h alone
        h = self.norm2(h) * (1 + s) + b
        return self.skip(x) + self.conv2(F.silu(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of the smallest map,
    residual: far-apart strokes meet in one layer. Its cost grows
    with the square of the pixel count, hence only there."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))
        qkv = qkv.reshape(B, 3, self.heads, C // self.heads, H * W)
        # q, k, v: [B, heads, H W, C / heads] each
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """v_theta(x_t, t, y): [B, 1, 28, 28], [B], [B] -> [B, 1, 28, 28].
    `channels`: the widths of 1 to 3 levels (28, 14, 7 pixels),
    multiples of 8; attention runs at the coarsest."""

    def __init__(self, channels=(32, 64, 128)):
        super().__init__()
        c0 = self.c0 = channels[0]
        # the width of the conditioning vector, as in Ho et al.
        emb_dim = 4 * c0
        self.time_mlp = nn.Sequential(
            nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(NUM_CLASSES + 1, emb_dim)
        self.stem = nn.Conv2d(1, c0, 3, padding=1)
        # Down: a block per level, kept as its skip, then a strided
        # 3x3 conv halves the resolution.
        widths = list(zip([c0, *channels], channels))
        self.down = nn.ModuleList(ResBlock(a, b, emb_dim) for a, b in widths)
        self.downsample = nn.ModuleList(
            nn.Conv2d(c, c, 3, stride=2, padding=1) for c in channels[:-1])
        c = channels[-1]
        self.mid1 = ResBlock(c, c, emb_dim)
        self.mid_attn = SelfAttention(c)
        self.mid2 = ResBlock(c, c, emb_dim)
        # Up: the mirror image, each level with its skip. Resize, then
        # convolve: a transposed convolution tends to print a
        # checkerboard (Odena et al. 2016).
        self.up = nn.ModuleList(ResBlock(2 * c, c, emb_dim) for c in reversed(channels))
        widths = zip(channels[:0:-1], channels[-2::-1])
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(a, b, 3, padding=1))
            for a, b in widths)
        self.out_norm = nn.GroupNorm(8, c0)
        self.out_conv = zero_init(nn.Conv2d(c0, 1, 3, padding=1))

    def forward(self, x_t, t, y):
        # "when" plus "what"
        emb = self.time_mlp(timestep_embedding(t, self.c0)) + self.label_emb(y)
        h = self.stem(x_t)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], 1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.out_conv(F.silu(self.out_norm(h)))


# -----------------------------------------------------------------------------
# 4. The loss and the training loop
#
# Ho et al. show (eq. 8-12) that learning to reverse the process comes
# down, up to weights, to predicting the noise. Their Algorithm 1:
#
#   1: repeat
#   2:   x_start ~ q(x_start), a training image
#   3:   t ~ Uniform({0, ..., T-1})
#   4:   eps ~ N(0, I)
#   5:   gradient step on || eps - eps_theta(x_t, t) ||^2  (x_t by eq. 4)
#   6: until converged
#
# Two changes serve a short run. Line 5: its error is SNR_t times that
# of the clean image (eq. 15: || eps - eps_theta ||^2 = SNR_t || x_start -
# x_start_hat ||^2), so nearly clean steps, whose detail no one sees,
# would dominate the gradient, and a wrong eps at high noise is a
# grossly wrong image. We regress v instead (Salimans & Ho 2022):
#
#     || v - v_theta ||^2 = (1 + SNR_t) || x_start - x_start_hat ||^2,
#
# the weighting of Karras et al. 2022 (EDM) with sigma_data = 1,
# and a target of unit scale at every t. Line 3: t is drawn where the
# digits take shape rather than uniformly: log SNR_t, nearest a draw
# from a normal (EDM's density of noise levels, Table 1 and section 5;
# Hang et al. 2024 compare such densities):
#
#     log SNR_t ~ N(LOG_SNR_MEAN, LOG_SNR_STD^2).
#
# Label dropout (Ho & Salimans 2022, Algorithm 1) replaces y by "no
# label" 20% of the time. Around it: two optimizers (below), with a
# warm-up, cosine decay and clipped gradients; and an exponential moving
# average (EMA) of the weights, which we sample with: it smooths out the
# jitter of the raw weights. Every draw comes from one CPU generator,
# the same on any device and saved with a run, so that a resumed run
# goes on exactly. The loss stays float32.
P_UNCOND = 0.2          # how often the label is dropped
LOG_SNR_MEAN = -0.6     # where the drawn noise levels centre,
LOG_SNR_STD = 2.4       # and their spread, in log SNR
EMA_DECAY = 0.999       # the EMA keeps this share each step
WARMUP_FRACTION = 0.05  # the learning rate's warm-up, of all steps
MUON_MOMENTUM = 0.95    # Muon's momentum, beta


def autocast(device, precision):
    """bfloat16 autocast where `precision` is "bf16" (section 7 decides)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def diffusion_loss(model, x_start, y, sched, gen):
    """Algorithm 1, line 5's loss on a batch x_start of digits y, with
    the v target and t drawn by log SNR."""
    B, device = len(x_start), x_start.device
    # Drawn on the CPU, then moved: the same numbers on any device.
    log_snr = LOG_SNR_MEAN + LOG_SNR_STD * torch.randn(B, generator=gen)
    # 4: eps ~ N(0, I)
    eps = torch.randn(x_start.shape, generator=gen)
    # label dropout: "no label" with probability P_UNCOND
    drop = torch.rand(B, generator=gen) < P_UNCOND
    log_snr, eps, drop = log_snr.to(device), eps.to(device), drop.to(device)
    # 3: t, the timestep whose log SNR_t is nearest the draw
    t = (snr(sched.alphas_bar).log() - log_snr[:, None]).abs().argmin(1)
    y = torch.where(drop, NULL_LABEL, y)
    x_t = q_sample(x_start, t, eps, sched.alphas_bar)
    alpha_bar = sched.alphas_bar[t].view(-1, 1, 1, 1)
    # v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_start
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x_start
    # 5: || v - v_theta(x_t, t, y) ||^2
    return (model(x_t, t, y).float() - v).square().mean()


def get_lr(step, total_steps, peak):
    """Linear warm-up (the first momenta rest on few batches),
    then cosine decay to zero: the last steps refine, not jump."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return peak * ((step + 1) / warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)))


# The optimizers. Adam scales each weight's step by that weight's own
# gradient history. Muon (Jordan et al. 2024) steps a weight matrix W as
# a whole, along its Nesterov momentum G = g + beta M made orthogonal:
# G = U S V^T (its singular value decomposition) becomes U V^T, all of
# whose directions have length 1, so that directions the gradient seldom
# takes learn as fast as the common ones. Five Newton-Schulz iterations,
# with Jordan et al.'s coefficients, take X = G / ||G||_F near U V^T: the
# same U and V, all but the tiniest singular values pulled from (0, 1]
# to between about 0.7 and 1.2,
#
#     X <- a X + b (X X^T) X + c (X X^T)^2 X.
#
# A conv's kernel [out, in, 3, 3] is the matrix [out, 9 in]. The step is
# scaled by 0.2 sqrt(max(rows, columns)), to the size of Adam's (Liu et
# al. 2025), so that one learning rate serves both. Muon takes every
# weight matrix; Adam the vectors: biases and the norms' gains.
def orthogonalize(G):
    """Nearly U V^T, for G = U S V^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized, for weight matrices:
    Muon(matrices, dict(lr=lr))."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for W in group["params"]:
                state = self.state[W]
                if not state:
                    state["M"] = torch.zeros_like(W)
                # M = beta M + g, and Nesterov's look-ahead g + beta M
                M = state["M"].mul_(MUON_MOMENTUM).add_(W.grad)
                G = (W.grad + MUON_MOMENTUM * M).flatten(1)
                # W = W - lr 0.2 sqrt(max(rows, columns)) orthogonalize(G)
                scale = group["lr"] * 0.2 * max(G.shape) ** 0.5
                W.sub_(scale * orthogonalize(G).view_as(W))


def make_optimizers(model, lr):
    """Muon for the weight matrices, Adam (no weight decay) for the
    vectors."""
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    return Muon(matrices, dict(lr=lr)), torch.optim.Adam(vectors, lr)


def train_loop(model, ema, opts, x_all, y_all, sched, cfg, gen, precision, step=0):
    """Algorithm 1 on shuffled batches for cfg["epochs"] epochs, from
    `step` (an epoch's end) on. Yields (step, loss) after each step,
    the loss left on the device: reading it would wait for a GPU."""
    batch = cfg["batch_size"]
    steps_per_epoch = math.ceil(len(x_all) / batch)
    total_steps = cfg["epochs"] * steps_per_epoch
    model.train()
    # 1: repeat, epoch by epoch, in a fresh order each time
    for epoch in range(step // steps_per_epoch, cfg["epochs"]):
        perm = torch.randperm(len(x_all), generator=gen).to(x_all.device)
        for i in range(steps_per_epoch):
            # 2: x_start ~ q(x_start), with its digit
            idx = perm[i * batch:(i + 1) * batch]
            with autocast(x_all.device, precision):
                loss = diffusion_loss(model, x_all[idx], y_all[idx], sched, gen)
            # 5: the gradient step, clipped: one bad batch undoes little
            model.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] = get_lr(step, total_steps, cfg["lr"])
                # Muon's matrix products in bf16 too, where the run is
                with autocast(x_all.device, precision):
                    opt.step()
            step += 1
            # ema = decay ema + (1 - decay) model; the decay ramps up,
            # so that the EMA does not stay near the random start
            decay = min(EMA_DECAY, step / (9 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            yield step, loss.detach()


# -----------------------------------------------------------------------------
# 5. Sampling: running the process backwards (DDPM)
#
# Ho et al.'s Algorithm 2, in this file's 0-based t:
#
#   1: x_{T-1} ~ N(0, I)
#   2: for t = T-1, ..., 0:
#   3:   z ~ N(0, I) if t > 0, else z = 0
#   4:   x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t))
#                  / sqrt(alpha_t) + sigma_t z
#   5: end for
#   6: return x_{-1}, the clean x_start
#
# Line 4's first term is the mean of the true posterior q(x_{t-1} |
# x_t, x_start) (eq. 6-7) at the clean image that the predicted noise
# implies, x_start_hat (eq. 15). Algorithm 2 leaves sigma_t open;
# section 3.2 offers sigma_t^2 = beta_t, or the posterior's variance
# beta~_t of eq. 7, which we take. As in Ho et al.'s code, x_start_hat,
# a wild guess early on, is clipped to [-1, 1], and eps replaced by the
# noise that the clipped estimate implies (without: speckled, washed
# out samples). eps_model(x_t, t) stands for the noise that the trained
# network predicts for the digit y, eps_theta(x_t, t, y), through its v
# (section 2's second equation for v); section 6 adds guidance.
def clip_x_start(x_t, eps, alpha_bar):
    """x_start_hat clipped to [-1, 1], and the noise it implies."""
    x_start_hat = predict_x_start(x_t, eps, alpha_bar).clamp(-1, 1)
    # eq. 4 solved for eps
    eps = (x_t - alpha_bar.sqrt() * x_start_hat) / (1 - alpha_bar).sqrt()
    return x_start_hat, eps


@torch.no_grad()
def ddpm_sample(eps_model, sched, x, gen=None, callback=None):
    """Algorithm 2 from pure noise x (line 1), over all T steps."""
    # 2: for t = T-1, ..., 0
    for t in reversed(range(sched.T)):
        # 3: z ~ N(0, I) if t > 0, else z = 0
        z = 0
        if t > 0:
            z = torch.randn(x.shape, generator=gen).to(x.device)
        _, eps = clip_x_start(x, eps_model(x, t), sched.alphas_bar[t])
        # 4: x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps)
        #              / sqrt(alpha_t) + sigma_t z,  sigma_t^2 = beta~_t
        eps_term = sched.betas[t] / (1 - sched.alphas_bar[t]).sqrt() * eps
        x = (x - eps_term) / sched.alphas[t].sqrt() + sched.posterior_variance[t].sqrt() * z
        if callback:
            callback(x)
    # 6: return x_start
    return x


# -----------------------------------------------------------------------------
# 6. Faster sampling, guidance, and which digit to draw
#
# DDIM (Song et al. 2021, eq. 12 and 16; their alpha is our alpha_bar)
# is a process with the same marginals q(x_t | x_start) (eq. 4) as
# DDPM's, so the same trained network serves it, but it can skip
# steps. On a few timesteps from high t down to 0, t' being the next
# one down (after t = 0 comes x_start, alpha_bar 1):
#
#     x_t' = sqrt(alpha_bar_t') x_start_hat
#            + sqrt(1 - alpha_bar_t' - sigma^2) eps_theta + sigma z,
#     sigma = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t))
#                 sqrt(1 - alpha_bar_t / alpha_bar_t'):
#
# the predicted clean image, noised to t'; the direction back to x_t,
# along the predicted noise; and fresh noise.
#
# eta = 0 draws no fresh noise, and 20 of its steps come close to
# DDPM's 1000 (Song et al. section 5); eta = 1 on all T steps is
# Algorithm 2 exactly, with sigma_t^2 = beta~_t. Below: which
# timesteps, which eta, classifier-free guidance, which digit.
STEPS = 20                # DDIM's steps per sample (with guidance, 2 calls each)
MAX_NOISE_RATIO = 80      # start where the noise is 80 times the signal
NOISY_BELOW = 0.05        # eta is 1 while alpha_bar_t is below this,
ETA_LATER = 0.5           # and this after


# Which timesteps. At t = T-1 the image is pure noise, a level that
# training (section 4) almost never draws: the network's guess there is
# poor, and the first step is wild. So the steps start at the
# highest t whose noise is at most MAX_NOISE_RATIO times the signal,
# sqrt((1 - alpha_bar_t) / alpha_bar_t) = 1 / sqrt(SNR_t) <= 80 (Karras
# et al. 2022's sigma_max; not DDIM's sigma), and are even in log SNR_t
# down to t = 0, as in DPM-Solver (Lu et al. 2022): steps even in t
# would leave few where the noise is low and the strokes take shape.
#
# Which eta. eta = 0 follows the network's errors into the image;
# fresh noise washes them out (Karras et al. 2022, section 4), as a
# short run's model needs, but eta = 1 throughout blurs. So eta is 1
# while the image is nearly all noise, then ETA_LATER. The model
# without a label (y = "no label", even_in_t) must still choose its
# digit as it goes, at middling noise: steps even in t put more steps
# there than steps even in log SNR do. It steps evenly in t from T-1,
# with eta 1 (the clip tames the wild first step).
def ddim_t_max(alphas_bar):
    """The highest t whose noise is at most MAX_NOISE_RATIO times
    the signal."""
    # (1 - a) / a <= S^2  <=>  a (1 + S^2) >= 1; alpha_bar falls with t,
    # so the t that pass are 0, ..., t_max
    return int((alphas_bar * (1 + MAX_NOISE_RATIO ** 2) >= 1).sum()) - 1


def ddim_timesteps(alphas_bar, steps, even_in_t=False):
    """`steps` falling timesteps, the last 0 if steps > 1, and their etas."""
    if even_in_t:
        ts = torch.linspace(len(alphas_bar) - 1, 0, steps, dtype=torch.float64)
        return ts.round().long().tolist(), [1.0] * steps
    log_snr = snr(alphas_bar.double()).log()
    t_max = ddim_t_max(alphas_bar)
    targets = torch.linspace(log_snr[t_max].item(), log_snr[0].item(), steps, dtype=torch.float64)
    # the timestep nearest each target; then strictly falling: a
    # duplicate moves up by one, never above t_max
    ts = [int((log_snr - v).abs().argmin()) for v in targets]
    for i in reversed(range(steps - 1)):
        ts[i] = min(max(ts[i], ts[i + 1] + 1), t_max - i)
    etas = [1.0 if alphas_bar[t] < NOISY_BELOW else ETA_LATER for t in ts]
    return ts, etas


@torch.no_grad()
def ddim_sample(eps_model, sched, x, ts, etas, gen=None, callback=None):
    """Song et al.'s eq. 12 from pure noise x, on the falling timesteps
    ts, with eta etas[i] at step i."""
    # alpha_bar at each t of ts, then 1: after t = 0 comes x_start
    alphas_bar_ts = [*sched.alphas_bar[ts], torch.ones_like(sched.alphas_bar[0])]
    for i, t in enumerate(ts):
        alpha_bar, alpha_bar_next = alphas_bar_ts[i], alphas_bar_ts[i + 1]
        # x_start_hat (eq. 15), clipped as in DDPM, and its eps
        x_start_hat, eps = clip_x_start(x, eps_model(x, t), alpha_bar)
        # eq. 16: sigma = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t))
        #                     sqrt(1 - alpha_bar_t / alpha_bar_t')
        ratio = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
        sigma = etas[i] * ratio.sqrt()
        # eq. 12, without its sigma z: the clamp guards rounding
        x = (alpha_bar_next.sqrt() * x_start_hat
             + (1 - alpha_bar_next - sigma ** 2).clamp(min=0).sqrt() * eps)
        # + sigma z, except at the last step, where sigma = 0
        if etas[i] > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=gen).to(x.device)
        if callback:
            callback(x)
    return x


# Classifier-free guidance (Ho & Salimans 2022, eq. 6) runs the
# network with the label and with "no label", and extrapolates away
# from the latter:
#
#     eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, none).
#
# The noise prediction points away from likely images (it is -sqrt(1 -
# alpha_bar_t) times the gradient of log p(x_t)), so this follows
# p(x | y) p(y | x)^w: a larger w draws more typical, more
# clearly-that-digit samples, at a cost in variety. The two calls go
# as one batch of twice the size: one pass through the network instead
# of two, on the same weights.
GUIDANCE = 0.2    # w


def make_eps_model(model, y, w, precision, alphas_bar):
    """eps_model(x_t, t): the noise that the network's v implies, for
    digits y, guided with weight w (w = 0: the plain network; y =
    NULL_LABEL: the model without a label)."""
    def eps_model(x_t, t):
        t_batch = torch.full((len(x_t),), t, device=x_t.device)
        with autocast(x_t.device, precision):
            if w == 0:
                v = model(x_t, t_batch, y).float()
            else:
                no_label = torch.full_like(y, NULL_LABEL)
                both = model(torch.cat([x_t, x_t]), torch.cat([t_batch, t_batch]),
                             torch.cat([y, no_label]))
                v_cond, v_uncond = both.float().chunk(2)
                # eq. 6 on v, which is eps's twin: eps is affine in v
                v = (1 + w) * v_cond - w * v_uncond
        # eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t
        return alphas_bar[t].sqrt() * v + (1 - alphas_bar[t]).sqrt() * x_t
    return eps_model


# With no digit asked for, p(x) = sum_y p(y) p(x | y): draw a digit
# per sample, then a sample of it. Dhariwal & Nichol's and Karras et
# al.'s code draw labels uniformly; here p(y) is MNIST's own: how
# often each digit occurs among its 60,000 training images.
MNIST_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)


def random_digits(n, seed):
    """n digits drawn from p(y)."""
    p = torch.tensor(MNIST_COUNTS, dtype=torch.float)
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(p, n, replacement=True, generator=gen)


# Putting it together: a sampler's settings, and images drawn with them
# in batches, from one generator, so that a seed fixes every sample.
Sampler = namedtuple("Sampler", "ts etas guidance")   # ts None: DDPM


def generate(model, sched, labels, sampler, seed=0, precision="fp32", callback=None):
    """Images [N, 1, 28, 28] in [-1, 1] for the N labels (NULL_LABEL:
    none), in batches of 100; callback(x_t) sees each x_t of the first."""
    device = next(model.parameters()).device
    sched = sched.to(device)
    # one generator, on the CPU: a seed fixes the same noise on any device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for y in labels.split(100):
        y = y.to(device)
        # pure noise
        x = torch.randn((len(y), 1, 28, 28), generator=gen).to(device)
        if callback:
            callback(x)
        eps_model = make_eps_model(model, y, sampler.guidance, precision, sched.alphas_bar)
        if sampler.ts is None:
            x = ddpm_sample(eps_model, sched, x, gen, callback)
        else:
            x = ddim_sample(eps_model, sched, x, sampler.ts, sampler.etas, gen, callback)
        callback = None
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# 7. Running the method: device, precision, sampler, checkpoints
#
# From here on, what a run needs around the method; a first read can
# skip it. A checkpoint is plain data (the run's config and step, the
# EMA's weights, and, until the run ends, what a resume needs), saved
# atomically and read with torch.load(weights_only=True).
CKPT = "ddpm_mnist.pt"
SHIPPED = Path(__file__).resolve().parent / "samples" / CKPT


def setup_device():
    """The device (CUDA, else Apple's MPS, else the CPU) and the
    precision: bf16 where the hardware has bf16 units, else fp32 (as on
    MPS), by the hardware alone, so that a command repeats."""
    if torch.cuda.is_available():
        name = "cuda"
        bf16 = torch.cuda.get_device_capability()[0] >= 8
    elif torch.backends.mps.is_available():
        name = "mps"
        bf16 = False
    else:
        name = "cpu"
        # the CPU's, by private functions: where they are missing, fp32
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        bf16 = any(getattr(torch.cpu, f, lambda: False)() for f in probes)
    return torch.device(name), "bf16" if bf16 else "fp32"


def choose_sampler(labelled, sched, steps=None, eta=None, guidance=None):
    """The sampler's defaults, decided here: DDIM in STEPS steps, from
    ddim_t_max and guided for a label; for none, even in t, eta 1. All
    T steps: DDPM's Algorithm 2 (DDIM's eta 1 on all T steps)."""
    if guidance and not labelled:
        raise UserError("--guidance needs a digit to guide towards: --uncond has none")
    if guidance is None:
        guidance = GUIDANCE if labelled else 0.0
    if steps == sched.T and eta in (None, 1):
        return Sampler(None, None, guidance)
    max_steps = sched.T
    if labelled:
        max_steps = ddim_t_max(sched.alphas_bar) + 1
    steps = steps or min(STEPS, max_steps)
    if steps > max_steps:
        raise UserError(f"--steps {steps}: DDIM takes 1 to {max_steps}, DDPM {sched.T}")
    ts, etas = ddim_timesteps(sched.alphas_bar, steps, even_in_t=not labelled)
    if eta is not None:
        etas = [eta] * steps
    return Sampler(ts, etas, guidance)


def atomic_save(obj, path, replace):
    """Save to a temporary file, then rename it to `path` (replace), or
    link it there, which fails if `path` exists: a killed save leaves
    the last one whole, and two runs cannot overwrite each other."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    """A checkpoint as plain data, and the U-Net of its EMA weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = UNet(ckpt["config"]["channels"])
        # a finished run's float16 weights, copied into float32 ones
        model.load_state_dict(ckpt["ema"])
    except Exception as e:
        raise UserError(f"{path}: not a ddpm_mnist checkpoint ({type(e).__name__})") from None
    if ckpt.get("predicts") != "v":
        raise UserError(f"{path}: from an older ddpm_mnist, whose U-Net predicts eps: train anew")
    return ckpt, model


# -----------------------------------------------------------------------------
# 8. Pictures, and evaluation: how good are the samples?
def grid_image(x, nrow):
    """[N, 1, 28, 28] in [-1, 1] -> a grayscale grid, nrow per row, with
    white gutters (black ones would merge the black tiles)."""
    from torchvision.utils import make_grid
    # clamped, as a cast to uint8 wraps (256 -> 0); rounded, as
    # truncation darkens
    x = ((x.cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(make_grid(x, nrow, pad_value=255)[0].numpy())


def save_image(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {path}")


# The Frechet Inception Distance (Heusel et al. 2017) fits a Gaussian
# to the features of real images and one to those of samples, and
# measures the distance between them:
#
#     |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
#
# Here the features are the 128 of a small MNIST classifier's last
# hidden layer (Inception's need a download, and see digits as
# blobs): not comparable with papers' FIDs. Compare them with each
# other and with the floor, the FID of as many real training images
# (FID grows as n shrinks).
def conv(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def classifier():
    """A small CNN: its features are clf[:-2](x), its logits clf(x)."""
    return nn.Sequential(
        conv(1, 32), conv(32, 32), nn.MaxPool2d(2),
        conv(32, 64), conv(64, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Dropout(0.3), nn.Linear(128, NUM_CLASSES))


@torch.no_grad()
def classify(clf, x):
    """Features [N, 128] (float64, on the CPU), and predicted digits."""
    device = next(clf.eval().parameters()).device
    # float64 on the CPU: Apple's GPUs have none
    feats = torch.cat([clf[:-2](b.to(device)).cpu().double() for b in x.split(1000)])
    return feats, clf[-2:](feats.float().to(device)).argmax(1).cpu()


def train_classifier(data_dir, device, precision):
    """A classifier trained on MNIST for 3 epochs, each batch shifted up
    to 2 pixels."""
    x, y = load_mnist(data_dir)
    torch.manual_seed(0)
    clf = classifier().to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = 3 * math.ceil(len(x) / 128)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(3):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = F.pad(x[idx], (2, 2, 2, 2), value=-1)
            xb = torch.roll(xb, (dy, dx), dims=(2, 3))[:, :, 2:-2, 2:-2]
            with autocast(device, precision):
                logits = clf(xb.to(device))
            loss = F.cross_entropy(logits.float(), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr.step()
    return clf


def fid(feats_a, feats_b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64 (it
    subtracts large traces). S_a S_b is similar to a symmetric matrix
    with the same eigenvalues, all >= 0, so tr((S_a S_b)^(1/2)) is the
    sum of their roots (up to rounding, complex: their real parts)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = torch.cov(feats_a.T), torch.cov(feats_b.T)
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    traces = cov_a.trace() + cov_b.trace() - 2 * root_trace
    return float((mu_a - mu_b).square().sum() + traces)


# -----------------------------------------------------------------------------
# 9. The command line
#
# Each flag is checked by its argparse type as it is read. Any other
# mistake is a UserError: one line, exit code 1. Most are found before
# any work; a loss that turns NaN, as the run goes.
def run_config(args):
    """The run's checkpoint path, config, and checkpoint (None for a new
    run). A config is the defaults and the flags given; a resumed run
    has its own, which no flag may contradict."""
    # through a link, to its target: the link stays
    path = args.ckpt.resolve()
    flags = {k: v for k, v in vars(args).items() if k in TRAIN and v is not None}
    if not args.resume:
        if path.exists():
            raise UserError(f"{path} exists: continue it with --resume, or give another --ckpt")
        return path, {**TRAIN, **flags}, None
    ckpt, _ = load_checkpoint(path)
    clash = [f"--{k.replace('_', '-')} {v}" for k, v in flags.items() if ckpt["config"][k] != v]
    if clash:
        raise UserError(f"--resume goes on with {path}'s own config: drop {', '.join(clash)}")
    return path, ckpt["config"], ckpt


def cmd_train(args):
    path, cfg, ckpt = run_config(args)
    if ckpt and "optimizers" not in ckpt:
        print(f"{path} is a finished run (or an older ddpm_mnist's): nothing to resume")
        return
    device, precision = setup_device()
    x_all, y_all = load_mnist(args.data_dir, True, cfg["digit"], cfg["limit"])
    if cfg.setdefault("images", len(x_all)) != len(x_all):
        raise UserError(f"{path} trained on {cfg['images']} images, not {len(x_all)}")
    cfg["epochs"] = cfg["epochs"] or math.ceil(TRAIN_IMAGES / len(x_all))
    torch.manual_seed(cfg["seed"])
    model = UNet(cfg["channels"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opts = make_optimizers(model, cfg["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    first = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        for opt, state in zip(opts, ckpt["optimizers"]):
            opt.load_state_dict(state)
        gen.set_state(ckpt["rng"])
        first = ckpt["step"]
    sched = make_schedule(cfg["schedule"], cfg["timesteps"])
    per_epoch = math.ceil(len(x_all) / cfg["batch_size"])
    total = cfg["epochs"] * per_epoch
    print(f"{len(x_all):,} images, {total:,} steps | {device} {precision}")
    loop = train_loop(model, ema, opts, x_all.to(device), y_all.to(device),
                      sched.to(device), cfg, gen, precision, first)
    t0 = time.time()
    losses = []
    saved = ckpt is not None
    for step, loss in loop:
        losses.append(loss)
        # a line each tenth of an epoch, the losses read at once (a read
        # waits for a GPU)
        if step % per_epoch % max(1, per_epoch // 10):
            continue
        losses = torch.stack(losses)
        if not torch.isfinite(losses).all():
            raise UserError(f"the loss became NaN or infinite by step {step}: try a lower --lr")
        rate = (step - first) * cfg["batch_size"] / (time.time() - t0)
        print(f"step {step}  loss {losses.mean():.4f}  {rate:.0f} img/s", flush=True)
        losses = []
        # saved each epoch (each tenth of a longer run), the last time
        # with only the EMA's weights, in float16
        if step % (math.ceil(cfg["epochs"] / 10) * per_epoch) and step < total:
            continue
        state = dict(model=model.state_dict(), ema=ema.state_dict(),
                     optimizers=[o.state_dict() for o in opts], rng=gen.get_state())
        if step == total:
            state = dict(ema={k: v.half() for k, v in ema.state_dict().items()})
        # a new run's first save fails where another run saved meanwhile
        atomic_save(dict(predicts="v", config=cfg, step=step, **state), path, replace=saved)
        saved = True
        print(f"saved {path}")


def sample_setup(args):
    """For `sample` and `evaluate`: the model of --ckpt (else
    ./ddpm_mnist.pt, else the shipped one), its schedule, the sampler,
    the precision, the digit it learnt alone (or None), and the labels
    to draw: random digits, by default."""
    path = args.ckpt
    if path is None:
        path = Path(CKPT) if Path(CKPT).is_file() else SHIPPED
    ckpt, model = load_checkpoint(path)
    cfg = ckpt["config"]
    sched = make_schedule(cfg["schedule"], cfg["timesteps"])
    sampler = choose_sampler(not args.uncond, sched, args.steps, args.eta, args.guidance)
    device, precision = setup_device()
    print(f"checkpoint: {path} ({ckpt['step']} steps) | {device} {precision}")
    one = cfg["digit"]
    labels = random_digits(args.n, args.seed)
    # a model of one digit draws that digit, unless told otherwise
    digit = NULL_LABEL if args.uncond else args.digit
    if digit is None:
        digit = one
    if digit is not None:
        labels = torch.full((args.n,), digit)
    return model.to(device).eval(), sched, sampler, precision, one, labels


def cmd_sample(args):
    model, sched, sampler, precision, _, labels = sample_setup(args)
    nrow = math.ceil(math.sqrt(len(labels)))
    # For --trajectory: every x_t of the first 8 samples.
    frames = []
    x = generate(model, sched, labels, sampler, args.seed, precision,
                 lambda x_t: frames.append(x_t[:8]))
    save_image(grid_image(x, nrow), args.out)
    if args.trajectory:
        # a row for each of 8 samples, 10 snapshots from noise to digit
        picks = torch.linspace(0, len(frames) - 1, 10).round().long()
        rows = torch.stack([frames[j] for j in picks], 1)
        save_image(grid_image(rows.flatten(0, 1), 10), args.trajectory)


def cmd_forward(args):
    # Four images as x_t at 11 t from 0 to T-1, the same noise: a block
    # of rows for the linear schedule above one for the cosine.
    x_start = load_mnist(args.data_dir, limit=4)[0]
    torch.manual_seed(0)
    eps = torch.randn(x_start.shape)
    ts = torch.linspace(0, 999, 11).round().long()
    rows = []
    for name in ("linear", "cosine"):
        alphas_bar = make_schedule(name, 1000).alphas_bar
        rows += [q_sample(x, ts, e, alphas_bar) for x, e in zip(x_start, eps)]
    save_image(grid_image(torch.cat(rows), 11), args.out)


def cmd_evaluate(args):
    model, sched, sampler, precision, one, labels = sample_setup(args)
    device = next(model.parameters()).device
    # The judge: a classifier, trained afresh (a few minutes on a CPU),
    # and the features of the real test images (of a one-digit model:
    # that digit's).
    clf = train_classifier(args.data_dir, device, precision)
    x_test = load_mnist(args.data_dir, False, one)[0]
    test_feats = classify(clf, x_test)[0]
    # The floor: as many random real training images (the test images
    # would score 0), whose digits come as often as random digits do.
    x_real = load_mnist(args.data_dir, True, one)[0]
    real = torch.randperm(len(x_real), generator=torch.Generator().manual_seed(args.seed))
    floor = fid(classify(clf, x_real[real[:args.n]])[0], test_feats)
    x = generate(model, sched, labels, sampler, args.seed, precision)
    feats, pred = classify(clf, x)
    score = fid(feats, test_feats)
    print(f"FID {score:.3f}, floor {floor:.3f}: {score / floor:.2f}x the floor")
    if not args.uncond:
        print(f"the digit asked for: {100 * (pred == labels).float().mean().item():.2f}%")


# argparse types: each turns a flag's text into its value, or raises,
# which argparse reports in one line.
def in_range(kind, lo, hi=math.inf):
    def parse(text):
        value = kind(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is not in [{lo}, {hi}]")
        return value
    # argparse names the type in its message: "invalid int value: 'x'"
    parse.__name__ = kind.__name__
    return parse


def widths(text):
    """'32,64,128' -> [32, 64, 128]: 28 pixels halve to 14 and 7, no
    further, and GroupNorm(8) needs multiples of 8."""
    values = list(map(int, text.split(",")))
    if len(values) > 3 or any(c < 8 or c % 8 for c in values):
        raise argparse.ArgumentTypeError(f"{text}: give 1 to 3 widths, multiples of 8")
    return values


def writable(*suffixes):
    """A file path that can be written, ending in one of `suffixes`."""
    def parse(text):
        path = Path(text)
        near = next(p for p in path.absolute().parents if p.exists())
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: the name must end in {suffixes[0]}")
        if path.is_dir() or not near.is_dir() or not os.access(near, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: no file can be written there")
        return path
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    count = in_range(int, 1)
    fraction = in_range(float, 0, 1)
    image = writable(".png")
    digit = in_range(int, 0, 9)
    parser = Parser()
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = commands.add_parser("train", help="train a model")
    train.add_argument("--channels", type=widths)
    train.add_argument("--epochs", type=count)
    train.add_argument("--batch-size", type=count)
    train.add_argument("--lr", type=fraction)
    train.add_argument("--seed", type=int)
    train.add_argument("--digit", type=digit)
    train.add_argument("--limit", type=count)
    train.add_argument("--ckpt", type=writable(), default=CKPT)
    train.add_argument("--resume", action="store_true")
    sample = commands.add_parser("sample", help="draw digits")
    sample.add_argument("--n", type=count, default=64)
    sample.add_argument("--out", type=image, default="sample.png")
    sample.add_argument("--trajectory", type=image)
    forward = commands.add_parser("forward", help="picture the forward process")
    forward.add_argument("--out", type=image, default="forward.png")
    evaluate = commands.add_parser("evaluate", help="FID and accuracy of samples")
    evaluate.add_argument("--n", type=count, default=10_000)
    evaluate.set_defaults(digit=None)
    for p in (train, forward, evaluate):
        p.add_argument("--data-dir", default="./data")
    for p in (sample, evaluate):
        p.add_argument("--ckpt", type=Path, help="default ./ddpm_mnist.pt, else the shipped one")
        p.add_argument("--steps", type=count, help=f"default {STEPS}; all T: DDPM")
        p.add_argument("--eta", type=fraction)
        p.add_argument("--guidance", type=in_range(float, 0, 100))
        p.add_argument("--seed", type=int, default=0)
        labels = p.add_mutually_exclusive_group()
        labels.add_argument("--uncond", action="store_true")
        if p is sample:
            labels.add_argument("--digit", type=digit)
    return parser


def main(argv=None):
    # A UserError is the user's to fix: one line, exit 1. Anything else
    # is a bug in this file, and keeps its traceback for the report.
    args = build_parser().parse_args(argv)
    commands = dict(train=cmd_train, sample=cmd_sample, forward=cmd_forward, evaluate=cmd_evaluate)
    try:
        commands[args.command](args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
