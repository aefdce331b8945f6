"""Tests for ddpm_mnist.py. Offline and fast (well under a minute on 2 cores).

They build a tiny MNIST in the real IDX format in a temporary folder, so
torchvision's own MNIST reader is exercised, and use tiny U-Nets.
"""

import argparse
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_mnist as D

HERE = Path(__file__).resolve().parent
META = torch.device("meta")
TINY = ["--channels", "8,16", "--timesteps", "20", "--batch-size", "64"]


# --- fixtures ----------------------------------------------------------------

def write_idx(path, arr):
    """The IDX format MNIST ships in: magic (0x08 = uint8, then ndim), dims, bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 + arr.ndim))
        f.write(struct.pack(f">{arr.ndim}I", *arr.shape))
        f.write(arr.tobytes())


def fake_digits(n, seed):
    """Images a classifier can tell apart: digit d is a bright bar at column 3 + 2d."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28))
    for i, d in enumerate(labels):
        images[i, 4:24, 3 + 2 * d:6 + 2 * d] = 255
    return images, labels


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", 256, 0), ("t10k", 100, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def trained(mnist_dir, tmp_path_factory):
    """A tiny model trained for one epoch through the real CLI."""
    out = tmp_path_factory.mktemp("trained")
    ckpt = out / "m.pt"
    D.main(["train", "--data-dir", str(mnist_dir), "--epochs", "1", "--ckpt", str(ckpt), *TINY])
    return ckpt


def run(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        D.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def tiny_model(seed=0, channels=(8, 16), randomise_output=True):
    torch.manual_seed(seed)
    m = D.UNet(channels, 1).eval()
    if randomise_output:   # zero-init makes an untrained U-Net output 0; wake it up
        torch.nn.init.normal_(m.out_conv.weight, std=0.3)
        for block in [b for level in m.down for b in level]:
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
    return m


# --- 1. data -------------------------------------------------------------------

def test_load_mnist_range_filter_and_limit(mnist_dir):
    x, y = D.load_mnist(mnist_dir)
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1 and x.min() == -1
    ones, y1 = D.load_mnist(mnist_dir, digit=1, limit=5)
    assert len(ones) == 5 and (y1 == 1).all()
    # "the first N ones": the same images as filtering all ones then slicing
    all_ones, _ = D.load_mnist(mnist_dir, digit=1)
    assert torch.equal(ones, all_ones[:5])
    x32, _ = D.load_mnist(mnist_dir, limit=3, image_size=32)
    assert x32.shape == (3, 1, 32, 32)


def test_missing_mnist_names_the_files(tmp_path, monkeypatch, capsys):
    def no_network(self):
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    code, _, err = run(["train", "--data-dir", tmp_path / "empty", *TINY], capsys)
    assert_one_line_error(code, err, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                          str(tmp_path / "empty" / "MNIST" / "raw"))


# --- 2. forward process --------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_endpoints_and_monotonicity(name):
    s = D.make_schedule(name, 1000)
    assert s.T == 1000 and s.betas.shape == (1000,)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    assert (s.alphas_bar[1:] < s.alphas_bar[:-1]).all()      # signal only ever decreases
    assert s.alphas_bar[0] > 0.999 and s.alphas_bar[-1] < 1e-3
    assert s.posterior_variance[0] == 0                     # the last sampling step adds no noise
    assert torch.allclose(s.alphas_bar_prev[1:], s.alphas_bar[:-1])


def test_schedule_values_match_the_papers():
    lin = D.make_schedule("linear", 1000)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    cos = D.make_schedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert cos.alphas_bar[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)
    # cosine keeps more signal through the middle of the process
    assert cos.alphas_bar[500] > 2 * lin.alphas_bar[500]


def test_q_sample_statistics():
    s = D.make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    for t in (0, 300, 999):
        x0 = torch.full((20000, 1, 2, 2), 0.5)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = D.q_sample(x0, torch.full((20000,), t), eps, s.alphas_bar)
        ab = s.alphas_bar[t].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), abs=0.01)


# --- 3. network ------------------------------------------------------------------

def test_unet_shapes_and_zero_init():
    m = D.UNet((8, 16, 32), 1)
    x = torch.randn(3, 1, 28, 28)
    out = m(x, torch.tensor([0, 10, 999]), torch.tensor([0, 9, D.NULL_LABEL]))
    assert out.shape == x.shape
    assert out.abs().max() == 0          # zero-initialised output layer
    m32 = D.UNet((8, 16, 32, 32), 2)
    assert m32(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]), torch.tensor([3, 4])).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("args,words", [
    (["--channels", "12,16"], ["multiple of 8"]),
    (["--channels", "8,16,32", "--image-size", "30"], ["image-size 30"]),
    (["--channels", "8,x"], ["32,64,128"]),
    (["--timesteps", "1", "--channels", "8,16"], ["timesteps"]),
    (["--digit", "12"], ["digit"]),
])
def test_bad_train_arguments(args, words, mnist_dir, tmp_path, capsys):
    code, _, err = run(["train", "--data-dir", mnist_dir, "--ckpt", tmp_path / "x.pt", *args], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "x.pt").exists()


# --- 4. loss and training -----------------------------------------------------------

class InputSpy(torch.nn.Module):
    """A stand-in network that records the t and y it is called with."""

    def __init__(self):
        super().__init__()
        self.ts, self.ys = [], []

    def forward(self, x, t, y):
        self.ts.append(t)
        self.ys.append(y)
        return torch.zeros_like(x)


def test_training_timesteps_cover_0_to_T_minus_1():
    spy = InputSpy()
    s = D.make_schedule("linear", 10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        D.diffusion_loss(spy, torch.zeros(50, 1, 4, 4), torch.zeros(50, dtype=torch.long), s, gen, "cpu")
    t = torch.cat(spy.ts)
    assert t.min() == 0 and t.max() == 9 and len(t.unique()) == 10


def test_a_few_steps_lower_the_loss(mnist_dir):
    x, y = D.load_mnist(mnist_dir, limit=64)
    s = D.make_schedule("cosine", 100)
    torch.manual_seed(0)
    m = D.UNet((8, 16), 1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def fixed_loss():   # same t, eps, labels every time
        with torch.no_grad():
            return D.diffusion_loss(m, x, y, s, torch.Generator().manual_seed(123), "cpu").item()
    before = fixed_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = D.diffusion_loss(m, x, y, s, gen, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before


def test_label_dropout_uses_the_null_label():
    spy = InputSpy()
    s = D.make_schedule("linear", 10)
    D.diffusion_loss(spy, torch.zeros(4000, 1, 2, 2), torch.full((4000,), 3), s, torch.Generator().manual_seed(0), "cpu")
    y = spy.ys[0]
    share = (y == D.NULL_LABEL).float().mean().item()
    assert set(y.unique().tolist()) == {3, D.NULL_LABEL}
    assert share == pytest.approx(D.P_UNCOND, abs=0.02)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_min_snr_weights(name):
    s = D.make_schedule(name, 1000)
    t = torch.arange(1000)
    w = D.min_snr_weights(s.alphas_bar, t)
    snr = s.alphas_bar / (1 - s.alphas_bar)
    assert torch.all(w[snr <= 5] == 1)                           # noisy steps keep their full weight
    assert torch.all(w[snr > 5] < 1) and w[0] < 1e-2             # nearly clean ones are damped
    assert torch.all(w[1:] >= w[:-1])                            # monotone in t
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5])


def test_lr_warms_up_then_decays_to_zero():
    f = D.lr_lambda(100)
    assert f(0) < f(2) < f(4) == 1.0
    assert f(50) < 1.0 and f(99) < 0.01 and f(100) == 0.0


def test_train_writes_checkpoint_and_grid(trained):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1          # 256 images / 64 per step
    assert ckpt["config"]["channels"] == [8, 16]
    assert (trained.parent / "m_epoch01.png").is_file()


def test_checkpoint_round_trip_reproduces_outputs(tmp_path):
    m = tiny_model()
    cfg = dict(channels=[8, 16], blocks=1, image_size=28, schedule="cosine", timesteps=50)
    path = tmp_path / "r.pt"
    D.atomic_save(dict(format="ddpm_mnist", config=cfg, ema=m.state_dict()), path)
    back = D.model_from_checkpoint(D.load_checkpoint(path), path).eval()
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 40]), torch.tensor([1, D.NULL_LABEL])
    with torch.no_grad():
        assert m(x, t, y).abs().max() > 0
        assert torch.equal(back(x, t, y), m(x, t, y))


def test_export_is_small_fp16_and_samples_alike(trained, tmp_path, capsys):
    out = tmp_path / "slim.pt"
    code, _, _ = run(["export", "--ckpt", trained, "--out", out], capsys)
    assert code == 0 and out.stat().st_size < trained.stat().st_size / 2
    slim = torch.load(out, weights_only=True)
    assert set(slim) >= {"config", "ema"} and "optimizer" not in slim
    assert all(v.dtype == torch.float16 for v in slim["ema"].values())
    args = ["sample", "--n", 4, "--steps", 5, "--seed", 1]
    for ck, png in ((trained, "a.png"), (out, "b.png")):
        assert run([*args, "--ckpt", ck, "--out", tmp_path / png, "--precision", "fp32"], capsys)[0] == 0
    a = np.asarray(Image.open(tmp_path / "a.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "b.png"), dtype=float)
    assert np.abs(a - b).mean() < 2.0       # fp16 weights: same pictures up to rounding


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(mnist_dir, tmp_path, monkeypatch, capsys):
    common = ["train", "--data-dir", mnist_dir, "--epochs", 2, "--precision", "fp32", *TINY]
    assert run([*common, "--ckpt", tmp_path / "straight.pt"], capsys)[0] == 0

    calls = {"n": 0}
    real_loss = D.diffusion_loss

    def killed_in_epoch_two(*a, **k):   # 4 steps per epoch: die at step 6
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_loss(*a, **k)
    monkeypatch.setattr(D, "diffusion_loss", killed_in_epoch_two)
    code, _, _ = run([*common, "--ckpt", tmp_path / "resumed.pt"], capsys)
    assert code == 130
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 4   # epoch 1 intact
    monkeypatch.setattr(D, "diffusion_loss", real_loss)

    # A flag that contradicts the checkpoint's config is refused, not ignored;
    # flags that repeat it (here *TINY and --epochs 2) are fine.
    code, _, err = run([*common, "--resume", "--ckpt", tmp_path / "resumed.pt", "--lr", 0.123], capsys)
    assert_one_line_error(code, err, "--lr 0.123", "its own config")
    code, out, _ = run([*common, "--resume", "--ckpt", tmp_path / "resumed.pt"], capsys)
    assert code == 0 and "resuming" in out and "step 8/8" in out
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6), k


def test_non_finite_loss_stops_with_the_step(mnist_dir, tmp_path, monkeypatch, capsys):
    real_loss = D.diffusion_loss
    calls = {"n": 0}

    def nan_at_step_2(*a, **k):
        calls["n"] += 1
        loss = real_loss(*a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(D, "diffusion_loss", nan_at_step_2)
    code, _, err = run(["train", "--data-dir", mnist_dir, "--ckpt", tmp_path / "n.pt", *TINY], capsys)
    assert_one_line_error(code, err, "nan", "step 2")


def test_atomic_save_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    D.atomic_save({"v": torch.ones(3)}, path)

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        D.atomic_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))


# --- 5. sampling -------------------------------------------------------------------

def test_samplers_walk_timesteps_T_minus_1_down_to_0():
    s = D.make_schedule("linear", 20)
    x = torch.randn(2, 1, 4, 4)
    y = torch.full((2,), D.NULL_LABEL)
    def visited(run):   # the timestep of each network call, in order
        spy = InputSpy()
        run(spy)
        return [int(t[0]) for t in spy.ts]
    assert visited(lambda m: D.ddpm_sample(m, s, x, y, gen=torch.Generator().manual_seed(0))) == list(range(19, -1, -1))
    assert visited(lambda m: D.ddim_sample(m, s, x, y, steps=20)) == list(range(19, -1, -1))
    ts = visited(lambda m: D.ddim_sample(m, s, x, y, steps=5))
    assert ts[0] == 19 and ts[-1] == 0 and len(set(ts)) == 5
    assert D.ddim_timesteps(1000, 1) == [999]


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_with_eta_1_and_all_steps_is_ddpm(clip):
    s = D.make_schedule("linear", 30)
    m = tiny_model()
    x_T = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([1, 2, D.NULL_LABEL])
    a = D.ddpm_sample(m, s, x_T, y, guidance=1.5, clip=clip, gen=torch.Generator().manual_seed(9))
    b = D.ddim_sample(m, s, x_T, y, steps=30, eta=1.0, guidance=1.5, clip=clip, gen=torch.Generator().manual_seed(9))
    assert a.abs().max() > 0.1
    # Without the clip an untrained model drives x to the thousands; compare at that scale.
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item()), (a - b).abs().max()


def test_ddim_eta_0_is_deterministic():
    s = D.make_schedule("cosine", 50)
    m = tiny_model()
    x_T = torch.randn(2, 1, 28, 28)
    y = torch.tensor([4, 7])
    a = D.ddim_sample(m, s, x_T, y, steps=10, gen=torch.Generator().manual_seed(1))
    b = D.ddim_sample(m, s, x_T, y, steps=10, gen=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = D.ddim_sample(m, s, x_T, y, steps=10, eta=1.0, gen=torch.Generator().manual_seed(1))
    d = D.ddim_sample(m, s, x_T, y, steps=10, eta=1.0, gen=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)


def test_dpm_timesteps_are_even_in_log_snr():
    s = D.make_schedule("cosine", 1000)
    ts = D.dpm_timesteps(s.alphas_bar, 20)
    assert len(ts) == 20 and ts[:2] == [999, 990] and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    steps_in_lambda = D.log_snr(s.alphas_bar)[ts[1:]].diff()
    # Even, except near t = 0 where lambda moves fast and t must be a whole number.
    assert (steps_in_lambda[:-2] - steps_in_lambda.median()).abs().max() < 0.1 * steps_in_lambda.median()
    assert D.dpm_timesteps(s.alphas_bar, 1) == [999] and D.dpm_timesteps(s.alphas_bar, 2) == [999, 0]
    # Exactly as many distinct steps as asked for, even where several lambdas
    # round to the same t, for any schedule and T.
    for name, T in (("cosine", 1000), ("linear", 1000), ("cosine", 20), ("linear", 7)):
        alphas_bar = D.make_schedule(name, T).alphas_bar
        for steps in [n for n in (3, 10, 50, T // 2, T) if n <= T]:
            ts = D.dpm_timesteps(alphas_bar, steps)
            assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0, (name, T, steps)
            assert all(a > b for a, b in zip(ts, ts[1:])), (name, T, steps)
    # The jump past the last 1% is for the cosine schedule's stretch of pure
    # noise; the linear schedule has none and starts its even spacing at T-1.
    assert D.dpm_timesteps(D.make_schedule("linear", 1000).alphas_bar, 20)[1] < 960


class ExactGaussianEps(torch.nn.Module):
    """The exact eps_theta when the data is N(0, s^2 I): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab)."""

    def __init__(self, alphas_bar, s):
        super().__init__()
        self.ab, self.s = alphas_bar.double(), s

    def forward(self, x, t, y):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return ((1 - ab).sqrt() * x / (ab * self.s ** 2 + 1 - ab)).float()


def test_dpm_solver_follows_the_ode_better_than_ddim():
    # For Gaussian data the probability-flow ODE has a closed form: x_t is x_T
    # scaled by the ratio of the marginal standard deviations. Both samplers
    # with eta = 0 approximate it; the second-order one should land closer.
    s, sd = D.make_schedule("cosine", 1000), 0.5
    m, y = ExactGaussianEps(s.alphas_bar, sd), torch.full((64,), D.NULL_LABEL)
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ab_T = s.alphas_bar[-1].double()
    exact = (x_T.double() * sd / (ab_T * sd ** 2 + 1 - ab_T).sqrt()).float()
    err = {}
    for steps in (6, 20):
        dpm = D.dpm_solver_sample(m, s, x_T, y, steps, clip=False)
        ddim = D.ddim_sample(m, s, x_T, y, steps, clip=False)
        err[steps] = ((dpm - exact).abs().max().item(), (ddim - exact).abs().max().item())
        assert err[steps][0] < 0.5 * err[steps][1], err
    assert err[20][0] < err[6][0] and err[20][0] < 0.05, err


@pytest.mark.parametrize("given,guided,sampler,eta", [
    ((None, None), True, "dpm++", 0.0),      # a digit: DPM-Solver++
    ((None, None), False, "ddim", 1.0),      # any digit: DDIM with fresh noise
    ((None, 0.0), False, "ddim", 0.0),       # --eta alone picks DDIM
    ((None, 0.5), True, "ddim", 0.5),
    (("ddim", None), True, "ddim", 0.0),     # deterministic DDIM for a digit
    (("ddim", None), False, "ddim", 1.0),
    (("ddpm", None), False, "ddpm", 1.0),
])
def test_sampler_defaults(given, guided, sampler, eta):
    args = argparse.Namespace(sampler=given[0], eta=given[1])
    D.resolve_sampler(args, guided)
    assert (args.sampler, args.eta) == (sampler, eta)


def test_dpm_solver_first_step_is_ddim():
    # With two timesteps there is no previous estimate to extrapolate from.
    s, m = D.make_schedule("cosine", 50), tiny_model()
    x_T, y = torch.randn(2, 1, 28, 28), torch.tensor([4, D.NULL_LABEL])
    a = D.dpm_solver_sample(m, s, x_T, y, steps=2, guidance=0.5)
    b = D.ddim_sample(m, s, x_T, y, steps=2, guidance=0.5)
    assert torch.allclose(a, b, atol=1e-5)


def test_classifier_free_guidance_formula():
    class TwoFaced(torch.nn.Module):
        def forward(self, x, t, y):   # eps(x, c) = 1, eps(x, none) = -1
            return torch.where((y == D.NULL_LABEL).view(-1, 1, 1, 1), -1.0, 1.0).expand_as(x).clone()
    x = torch.zeros(2, 1, 3, 3)
    eps = D.predict_eps(TwoFaced(), x, 5, torch.tensor([3, 4]), guidance=2.0, precision="fp32")
    assert torch.allclose(eps, torch.full_like(x, (1 + 2.0) * 1 - 2.0 * -1))
    eps0 = D.predict_eps(TwoFaced(), x, 5, torch.tensor([3, 4]), guidance=0.0, precision="fp32")
    assert torch.equal(eps0, torch.ones_like(x))


def test_seeded_sampling_is_reproducible_and_batched():
    s = D.make_schedule("cosine", 50)
    m = tiny_model()
    labels = torch.tensor([0, 1, 2, 3, 4])
    a = D.generate(m, s, labels, 28, steps=5, seed=3, batch_size=2)
    b = D.generate(m, s, labels, 28, steps=5, seed=3, batch_size=2)
    c = D.generate(m, s, labels, 28, steps=5, seed=4, batch_size=2)
    assert a.shape == (5, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("text,digit", [("7", 7), ("seven", 7), ("Seven", 7), (" SEVEN \n", 7), ("zero", 0), ("9", 9)])
def test_prompts_parse(text, digit):
    assert D.parse_prompt(text) == digit


@pytest.mark.parametrize("text", ["eleven", "77", "-1", "", "7.0", "sept"])
def test_bad_prompts_are_rejected(text):
    with pytest.raises(D.UserError, match="zero, one, two"):
        D.parse_prompt(text)


def test_sample_cli_grid_prompt_and_out_dir(trained, tmp_path, capsys):
    out = tmp_path / "deep" / "folder" / "g.png"
    code, stdout, _ = run(["sample", "--ckpt", trained, "--n", 6, "--steps", 4, "--prompt", " Seven ",
                           "--out", out, "--out-dir", tmp_path / "each"], capsys)
    assert code == 0, stdout
    assert str(trained) in stdout and "img/s" in stdout and "digit 7" in stdout
    assert "DPM-Solver++(2M) 4 steps, guidance 0.5" in stdout             # the guided default
    assert Image.open(out).size == (3 * 30 + 2, 2 * 30 + 2)          # ceil(sqrt(6)) = 3 per row
    files = sorted((tmp_path / "each").iterdir())
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(6)]
    img = Image.open(files[0])
    assert img.size == (28, 28) and img.mode == "L"


def test_per_class_grid_has_ten_rows(trained, tmp_path, capsys):
    code, _, _ = run(["sample", "--ckpt", trained, "--per-class", 3, "--steps", 2, "--out", tmp_path / "pc.png"], capsys)
    assert code == 0
    assert Image.open(tmp_path / "pc.png").size == (3 * 30 + 2, 10 * 30 + 2)


def test_trajectory_and_gif(trained, tmp_path, capsys):
    code, _, _ = run(["sample", "--ckpt", trained, "--n", 4, "--steps", 12, "--out", tmp_path / "g.png",
                      "--trajectory", tmp_path / "traj.png", "--gif", tmp_path / "rev.gif"], capsys)
    assert code == 0
    assert Image.open(tmp_path / "traj.png").size == (10 * 30 + 2, 4 * 30 + 2)   # 4 samples x 10 snapshots
    gif = Image.open(tmp_path / "rev.gif")
    # noise + 12 steps; Pillow merges identical neighbouring frames, hence <=
    assert gif.size == (2 * 30 + 2, 2 * 30 + 2) and 2 <= gif.n_frames <= 13
    gif.seek(gif.n_frames - 1)
    assert gif.info["duration"] >= 1000                                         # rests on the result


def test_interactive_driven_by_a_pipe(trained, tmp_path):
    pattern = tmp_path / "p_{digit}.png"
    proc = subprocess.run([sys.executable, str(HERE / "ddpm_mnist.py"), "sample", "--interactive", "--ckpt",
                           str(trained), "--n", "4", "--steps", "2", "--out", str(pattern)],
                          input="7\nSeven\nbanana\n three\n\nnine\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p_7.png").is_file() and (tmp_path / "p_3.png").is_file()
    assert not (tmp_path / "p_9.png").exists()                # the empty line ended it
    assert str(tmp_path / "p_7.png") in proc.stdout
    assert "banana" in proc.stderr and "zero, one" in proc.stderr


# --- bad input for sample -------------------------------------------------------------

def test_sample_bad_checkpoints(trained, tmp_path, capsys):
    code, _, err = run(["sample", "--ckpt", tmp_path / "nope.pt"], capsys)
    assert_one_line_error(code, err, "not found")

    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(trained.read_bytes()[:5000])
    code, _, err = run(["sample", "--ckpt", truncated], capsys)
    assert_one_line_error(code, err, "unreadable")

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    code, _, err = run(["sample", "--ckpt", other], capsys)
    assert_one_line_error(code, err, "not a ddpm_mnist checkpoint")

    ckpt = torch.load(trained, weights_only=True)
    ckpt["config"]["channels"] = [16, 32]              # the weights are 8,16
    mismatched = tmp_path / "mismatch.pt"
    torch.save(ckpt, mismatched)
    code, _, err = run(["sample", "--ckpt", mismatched], capsys)
    assert_one_line_error(code, err, "do not fit")

    ckpt = torch.load(trained, weights_only=True)
    ckpt["ema"]["out_conv.bias"][0] = float("nan")
    poisoned = tmp_path / "nan.pt"
    torch.save(ckpt, poisoned)
    code, _, err = run(["sample", "--ckpt", poisoned], capsys)
    assert_one_line_error(code, err, "NaN or infinite")


class Payload:
    pass


def test_a_checkpoint_cannot_run_code(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ddpm_mnist", "config": {}, "ema": Payload()}, evil)
    code, _, err = run(["sample", "--ckpt", evil], capsys)
    assert_one_line_error(code, err, "unreadable")


@pytest.mark.parametrize("args,words", [
    (["--digit", 12], ["digit 12"]),
    (["--n", 0], ["--n"]),
    (["--steps", 0], ["steps 0", "1 to t = 20"]),
    (["--steps", 21], ["steps 21"]),
    (["--prompt", "eleven"], ["eleven", "zero, one"]),
    (["--eta", 2], ["eta"]),
    (["--sampler", "euler"], ["invalid choice"]),
    (["--sampler", "dpm++", "--eta", 1], ["eta", "ddim"]),
    (["--sampler", "ddpm", "--steps", 5], ["steps", "all t"]),
])
def test_sample_bad_arguments(args, words, trained, tmp_path, capsys):
    code, _, err = run(["sample", "--ckpt", trained, "--out", tmp_path / "x.png", *args], capsys)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_nan_samples_are_reported_not_drawn(command, trained, mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "predict_eps", lambda model, x, *rest: torch.full_like(x, float("nan")))
    extra = ["--data-dir", mnist_dir, "--classifier", tmp_path / "clf.pt", "--n", 20] if command == "evaluate" else []
    code, _, err = run([command, "--ckpt", trained, "--steps", 2, "--out-dir", tmp_path / "each", *extra], capsys)
    assert_one_line_error(code, err, "nan")
    assert not (tmp_path / "each").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_asking_for_a_missing_gpu(trained, capsys):
    code, _, err = run(["sample", "--ckpt", trained, "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "cuda")


def test_auto_precision_on_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert D.pick_precision("bf16", cpu) == "bf16" and D.pick_precision("fp32", cpu) == "fp32"
    # without bf16 instructions: fp32, and no timing
    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: False)
    D.cpu_bf16_is_faster.cache_clear()
    assert D.pick_precision("auto", cpu) == "fp32"
    # with them, the timing runs and leaves seeded runs alone
    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: True)
    D.cpu_bf16_is_faster.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert D.pick_precision("auto", cpu) in ("bf16", "fp32")
    assert torch.equal(torch.rand(3), expected)
    D.cpu_bf16_is_faster.cache_clear()


@pytest.mark.parametrize("capability, precision", [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_needs_ampere(capability, precision, monkeypatch):
    # a Turing GPU only emulates bf16; no GPU is needed to check the rule
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert D.pick_precision("auto", torch.device("cuda")) == precision


def test_default_checkpoint_choice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "SHIPPED_CKPT", tmp_path / "shipped.pt")
    with pytest.raises(D.UserError, match="no checkpoint"):
        D.resolve_ckpt(None)
    (tmp_path / "shipped.pt").write_bytes(b"x")
    assert D.resolve_ckpt(None) == tmp_path / "shipped.pt"
    (tmp_path / "ddpm_mnist.pt").write_bytes(b"x")
    assert D.resolve_ckpt(None) == Path("ddpm_mnist.pt")
    assert D.resolve_ckpt("mine.pt") == Path("mine.pt")


# --- 6. pictures -------------------------------------------------------------------------

def test_forward_picture(mnist_dir, tmp_path, capsys):
    code, out, _ = run(["forward", "--data-dir", mnist_dir, "--n", 3, "--out", tmp_path / "f.png"], capsys)
    assert code == 0
    img = Image.open(tmp_path / "f.png")
    assert img.size == (11 * 30 + 2, 2 * (14 + 3 * 30 + 2))     # 11 timesteps; linear and cosine blocks
    rows = [l.split() for l in out.splitlines() if l.strip() and l.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    assert float(rows[5][2]) > float(rows[5][1])                  # cosine keeps more signal at t = 500


# --- 7. evaluation --------------------------------------------------------------------------

def test_frechet_distance_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mu1, mu2 = torch.zeros(5, dtype=torch.float64), torch.arange(5, dtype=torch.float64)
    # For S2 = c * S1: tr(S1 + S2 - 2 (S1 S2)^(1/2)) = (1 + c - 2 sqrt(c)) tr(S1)
    c = 4.0
    expected = (mu1 - mu2).square().sum() + (1 + c - 2 * math.sqrt(c)) * cov.trace()
    assert D.frechet_distance(mu1, cov, mu2, c * cov) == pytest.approx(expected.item(), rel=1e-9)
    # Diagonal covariances: sum of (sigma1 - sigma2)^2
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    fd = D.frechet_distance(torch.zeros(3), torch.diag(d1), torch.ones(3), torch.diag(d2))
    assert fd == pytest.approx(3 + (1 + 0 + 4), rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(D.fid(x, x)) < 1e-6
    assert D.fid(x, x + 1) == pytest.approx(16, rel=1e-6)


def test_same_digits_matches_the_requested_digits():
    y_real = torch.arange(300) % 10                      # 30 of each digit
    labels = torch.tensor([3, 3, 3, 7, 0, 9, 9])
    idx = D.same_digits(y_real, labels, torch.Generator().manual_seed(0))
    assert len(set(idx.tolist())) == len(idx)           # no image twice
    assert sorted(y_real[idx].tolist()) == sorted(labels.tolist())
    many = torch.full((40,), 5)                          # more fives than there are: all 30 of them
    assert sorted(D.same_digits(y_real, many, torch.Generator()).tolist()) == list(range(5, 300, 10))


def test_evaluate_runs_end_to_end(trained, mnist_dir, tmp_path, capsys):
    clf = tmp_path / "clf.pt"
    args = ["evaluate", "--ckpt", trained, "--data-dir", mnist_dir, "--classifier", clf, "--n", 20, "--steps", 2]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert clf.is_file() and "training one" in out
    for line in ("classifier test accuracy", "FID", "floor", "class histogram", "sampling time"):
        assert line in out
    fid_value = float(out.split("test images): ")[1].split()[0])
    assert fid_value >= 0
    assert "floor with" not in out                             # unconditional: one floor, MNIST's own mix
    code, out, _ = run([*args, "--conditional"], capsys)
    assert code == 0 and "training one" not in out            # the cached classifier is reused
    assert "accuracy per digit" in out and "accuracy overall" in out
    assert "floor with the samples' digits (20 real training images)" in out


def test_flops_per_image_do_not_depend_on_the_batch():
    model, sched = D.build_model(dict(channels=[8, 16], blocks=1, image_size=28, timesteps=20)), D.make_schedule("cosine", 20)
    per_image = []
    for batch in (2, 6):
        x0, y = torch.zeros(batch, 1, 28, 28), torch.zeros(batch, dtype=torch.long)
        per_image.append(D.training_flops_per_image(model, sched, x0, y, torch.device("cpu")))
    assert per_image[0] == pytest.approx(per_image[1], rel=1e-9)
    # the first 3x3 conv, 1 -> 8 channels on 28 x 28 pixels, is already 2 x 9 x 8 x 784 FLOPs forward
    assert per_image[0] > 2 * 9 * 8 * 784


def test_bench_reports_speed_and_share_of_peak(capsys):
    code, out, err = run(["bench", "--channels", "8,16", "--batch-size", 4, "--steps", 1, "--repeats", 1,
                          "--precision", "fp32"], capsys)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("fp32:"))
    assert "GFLOP/s" in line and "img/s" in line and "% of peak" in line
    assert "GFLOP per training image" in out
    code, _, err = run(["bench", "--steps", 0], capsys)
    assert_one_line_error(code, err, "--steps")


# --- devices ---------------------------------------------------------------



class MetaDevice(TorchDispatchMode):
    """The meta device as a stand-in GPU. Meta raises wherever a CPU tensor
    meets a meta one, as CUDA and MPS do; this mode adds what a GPU also does:
    copies back to the CPU and .item() work (they give zeros), and it records
    every float64 tensor made on the device (MPS has none)."""

    def __init__(self):
        super().__init__()
        self.float64 = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and src.device.type == "meta":
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if src.dtype == torch.bool else 0
            if func is torch.ops.aten._to_copy.default and kwargs.get("device", META).type == "cpu":
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        out = func(*args, **kwargs)
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and o.device.type == "meta" and o.dtype == torch.float64:
                self.float64.append(func)
        return out


def test_training_sampling_and_evaluation_on_a_device():
    with MetaDevice() as mode:
        s = D.make_schedule("cosine", 20)
        model = tiny_model().to(META).train()
        ema = tiny_model().to(META)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        lr = torch.optim.lr_scheduler.LambdaLR(opt, D.lr_lambda(10))
        x0, y = torch.zeros(4, 1, 28, 28, device=META), torch.tensor([1, 2, 3, 4], device=META)
        D.train_step(model, ema, opt, lr, x0, y, s, torch.Generator().manual_seed(0), META, "fp32", 0)
        x_T = torch.zeros(4, 1, 28, 28, device=META)
        gen = torch.Generator().manual_seed(0)
        D.ddpm_sample(ema.eval(), s, x_T, y, guidance=0.5, gen=gen)
        D.ddim_sample(ema, s, x_T, y, 5, eta=1.0, guidance=0.5, gen=gen)
        D.dpm_solver_sample(ema, s, x_T, y, 5, guidance=0.5)
        D.classify(D.Classifier().to(META), x_T)
    assert not mode.float64, mode.float64
