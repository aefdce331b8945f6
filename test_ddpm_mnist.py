"""Tests for ddpm_mnist.py, offline, in seconds: a tiny MNIST in the real
IDX format and tiny U-Nets. Each asserts a property that fails if the
method, or a safety rule, is broken."""

import errno
import math
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_mnist as D

TINY = ["--channels", "8,8,16", "--batch-size", "64"]

def write_idx(path, arr):
    """MNIST's IDX format: magic (0x0800 + ndim), sizes, bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = struct.pack(f">{arr.ndim + 1}I", 0x0800 + arr.ndim, *arr.shape)
    path.write_bytes(head + arr.tobytes())

def make_mnist(root, n_train=256, n_test=100):
    """Images a classifier tells apart: digit d, a bar at column 3 + 2d."""
    rng = np.random.default_rng(0)
    (root / "MNIST" / "raw").mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels, images = rng.integers(0, 10, n), rng.integers(0, 40, (n, 28, 28))
        for i, d in enumerate(labels):
            images[i, 4:24, 3 + 2 * d:6 + 2 * d] = 255
        write_idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels)
    return root

@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("data"))

@pytest.fixture(scope="session")
def trained(mnist_dir, tmp_path_factory):
    """A tiny model trained one epoch (4 steps), beside another's .tmp."""
    ckpt = tmp_path_factory.mktemp("trained") / "m.pt"
    (ckpt.parent / "m.pt.999.tmp").write_bytes(b"another run's save")
    D.main(["train", "--data-dir", str(mnist_dir), "--epochs", "1", "--ckpt", str(ckpt), *TINY])
    return ckpt

def run(argv, capsys):
    """The CLI in-process: (exit code, stdout, stderr), an exit's message on stderr as Python's."""
    try:
        D.main([str(a) for a in argv])
        return (0, *capsys.readouterr())
    except SystemExit as e:
        out, err = capsys.readouterr()
        return (1, out, err + e.code) if isinstance(e.code, str) else (e.code, out, err)

def refused(argv, capsys, *names):
    """The CLI stops: a non-zero exit and one line, no traceback, naming what was wrong."""
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert all(str(n).lower() in lines[0].lower() for n in names), lines[0]

def tiny_model():
    torch.manual_seed(0)
    m = D.UNet((8, 16)).eval()
    # zero-initialised layers: wake the output up
    for p in (m.out_conv.weight, *(b.conv2.weight for b in m.down)):
        torch.nn.init.normal_(p, std=0.3)
    return m

class Spy(torch.nn.Module):
    """Records the t and y the network is called with; predicts zero noise."""
    ts, ys = [], []

    def forward(self, x, t, y):
        self.ts, self.ys = self.ts + [t], self.ys + [y]
        return torch.zeros_like(x)

@pytest.mark.parametrize("name,content", [
    ("train-images-idx3-ubyte", np.zeros((256, 32, 32))),        # not 28x28
    ("train-images-idx3-ubyte", b"\0\0\x08\x03" + bytes(100)),   # truncated
    ("train-labels-idx1-ubyte", b"\0\0\x09\x01" + bytes(260)),   # wrong magic
    ("missing", None),                                           # none, and offline
])
def test_mnist_and_bad_files_named(name, content, mnist_dir, tmp_path, monkeypatch, capsys):
    x, y = D.load_mnist(mnist_dir)                            # first, good files
    assert x.shape == (256, 1, 28, 28) and x.min() == -1 and x.max() == 1
    ones, y1 = D.load_mnist(mnist_dir, digit=1, limit=5)
    assert (y1 == 1).all() and torch.equal(ones, D.load_mnist(mnist_dir, digit=1)[0][:5])
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(mnist_dir / "MNIST" / "raw", raw)
    if content is None:
        shutil.rmtree(raw)
        name = str(raw)
        monkeypatch.setattr("torchvision.datasets.MNIST.download", lambda self: 1 / 0)
    elif isinstance(content, bytes):
        (raw / name).write_bytes(content)
    else:
        write_idx(raw / name, content)
    monkeypatch.setattr(D, "UNet", lambda *a: pytest.fail("training started"))
    refused(["train", "--data-dir", tmp_path, "--ckpt", tmp_path / "m.pt"], capsys, name)

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_and_q_sample(name):
    s = D.make_schedule(name, 1000)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all() and (s.alphas_bar.diff() < 0).all()
    assert s.alphas_bar[0] > 0.999 and s.alphas_bar[-1] < 1e-3 and s.posterior_variance[0] == 0
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    first, last = {"linear": (1e-4, 0.02), "cosine": (1 - f(1) / f(0), 0.999)}[name]
    assert s.betas[0].item() == pytest.approx(first, rel=1e-4)
    assert s.betas[-1].item() == pytest.approx(last)
    assert torch.allclose(s.alphas_bar, torch.cumprod(1 - s.betas.double(), 0).float())
    assert name == "linear" or s.alphas_bar[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)
    for t in (0, 300, 999):                               # the statistics of q(x_t | x_0)
        x0 = torch.full((20000, 1, 2, 2), 0.5)
        x_t = D.q_sample(x0, torch.full((20000,), t), torch.randn(x0.shape), s.alphas_bar)
        ab = s.alphas_bar[t].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), abs=0.01)

def test_loss_oracle_its_draws_and_the_untrained_network():
    # For x_0 = 0: eps = x_t / sqrt(1 - ab), so the exact v = sqrt(ab) eps = sqrt(SNR) x_t.
    s = D.make_schedule("cosine", 1000)
    exact = lambda x_t, t, y: D.snr(s.alphas_bar[t]).sqrt().view(-1, 1, 1, 1) * x_t
    x0, y = torch.zeros(64, 1, 4, 4), torch.zeros(64, dtype=torch.long)
    assert D.diffusion_loss(exact, x0, y, s, torch.Generator().manual_seed(0)).item() < 1e-10
    # An exact noise predictor is the wrong target: its loss is far from 0.
    noise = lambda x_t, t, y: x_t / (1 - s.alphas_bar[t]).sqrt().view(-1, 1, 1, 1)
    assert D.diffusion_loss(noise, x0, y, s, torch.Generator().manual_seed(0)).item() > 0.1
    # Its t follow log SNR_t ~ N(mean, std^2); it drops the label 20% of the time.
    spy = Spy()
    D.diffusion_loss(spy, torch.zeros(40000, 1, 2, 2), torch.full((40000,), 3), s,
                     torch.Generator().manual_seed(0))
    t, y = spy.ts[0], spy.ys[0]
    log_snr = D.snr(s.alphas_bar[t].double()).log()
    assert log_snr.mean().item() == pytest.approx(D.LOG_SNR_MEAN, abs=0.05)
    assert log_snr.std().item() == pytest.approx(D.LOG_SNR_STD, rel=0.03)
    assert set(y.unique().tolist()) == {3, D.NULL_LABEL}
    assert (y == D.NULL_LABEL).float().mean().item() == pytest.approx(D.P_UNCOND, abs=0.02)
    m, x = D.UNet((8, 16, 32)), torch.randn(3, 1, 28, 28)    # the untrained U-Net: eps = 0
    assert m(x, torch.tensor([0, 10, 999]), torch.tensor([0, 9, D.NULL_LABEL])).abs().max() == 0

def test_muon_steps_along_the_orthogonalized_momentum():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(16, 72, generator=gen) * torch.logspace(-1, 1, 72)    # ill-conditioned
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    X = U.T @ D.orthogonalize(M) @ Vh.T     # diagonal (M's own U and V), near 1 (0.68 to 1.13)
    assert (X - torch.eye(16)).abs().max() < 0.4
    W = torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen))        # a [4, 27] matrix
    muon, expected, M = D.Muon([W], dict(lr=0.1)), W.detach().clone(), 0
    for _ in range(2):
        W.grad = torch.randn(4, 3, 3, 3, generator=gen)
        M = D.MUON_MOMENTUM * M + W.grad
        G = (W.grad + D.MUON_MOMENTUM * M).flatten(1)    # Nesterov's look-ahead
        expected -= 0.1 * 0.2 * 27 ** 0.5 * D.orthogonalize(G).view_as(W)
        muon.step()
    assert torch.allclose(W.detach(), expected, atol=1e-5)

def test_train_never_saves_over_a_checkpoint(trained, mnist_dir, tmp_path, monkeypatch, capsys):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["channels"] == [8, 8, 16]
    assert ckpt["config"]["images"] == 256 and "optimizers" not in ckpt
    assert all(v.dtype == torch.float16 for v in ckpt["ema"].values())
    # another run's temporary file is left alone
    assert [p.name for p in trained.parent.glob("*.tmp")] == ["m.pt.999.tmp"]
    before = trained.read_bytes()
    refused(["train", "--data-dir", mnist_dir, "--ckpt", trained, *TINY], capsys, "--resume")
    assert trained.read_bytes() == before
    # nor over a parallel run's, saved after this run checked that its --ckpt was free
    path, real_load = tmp_path / "m.pt", D.load_mnist

    def and_another_run_saves(*a):
        path.write_bytes(b"the other run's checkpoint")
        return real_load(*a)
    monkeypatch.setattr(D, "load_mnist", and_another_run_saves)
    refused(["train", "--data-dir", mnist_dir, "--ckpt", path, "--epochs", 1, *TINY], capsys, path)
    assert path.read_bytes() == b"the other run's checkpoint"
    assert not list(tmp_path.glob("*.tmp"))

def test_resume_after_a_kill_is_exact(mnist_dir, tmp_path, monkeypatch, capsys):
    common = ["train", "--data-dir", mnist_dir, "--epochs", 2, *TINY]
    assert run([*common, "--ckpt", tmp_path / "straight.pt"], capsys)[0] == 0
    real_loss, calls = D.diffusion_loss, []

    def killed_at_step_6(*a):   # 4 steps per epoch: killed in epoch 2
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_loss(*a)
    monkeypatch.setattr(D, "diffusion_loss", killed_at_step_6)
    killed = tmp_path / "resumed.pt"
    assert run([*common, "--ckpt", killed], capsys)[0] == 130
    assert torch.load(killed, weights_only=True)["step"] == 4             # epoch 1 intact
    monkeypatch.setattr(D, "diffusion_loss", real_loss)
    link = tmp_path / "link.pt"
    link.symlink_to(killed)
    # Refused: a flag unlike the run's own (all of `common` agree), and other data.
    refused([*common, "--resume", "--ckpt", link, "--channels", "32,64,128"], capsys, "--channels")
    other = make_mnist(tmp_path / "other", n_train=200)
    refused(["train", "--resume", "--ckpt", link, "--data-dir", other], capsys, "256", "200")
    # Resumed through a link: the link stays, its target is the run.
    assert run([*common, "--resume", "--ckpt", link], capsys)[0] == 0
    assert link.is_symlink() and link.resolve() == killed
    a, b = (torch.load(f, weights_only=True) for f in (tmp_path / "straight.pt", killed))
    assert a["step"] == b["step"] == 8
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert run([*common, "--resume", "--ckpt", killed], capsys)[0] == 0   # finished: nothing to do

def test_a_nan_loss_stops_and_saves_are_atomic(mnist_dir, tmp_path, monkeypatch, capsys):
    real_loss, calls = D.diffusion_loss, []

    def nan_at_step_3(*a):
        calls.append(1)
        return real_loss(*a) * (float("nan") if len(calls) == 3 else 1)
    monkeypatch.setattr(D, "diffusion_loss", nan_at_step_3)
    refused(["train", "--data-dir", mnist_dir, "--ckpt", tmp_path / "n.pt", *TINY], capsys,
            "nan", "step 3")
    assert not (tmp_path / "n.pt").exists()
    monkeypatch.undo()
    # A save that dies halfway, or finds the disk full, leaves the last one whole.
    path = tmp_path / "c.pt"
    D.atomic_save({"v": torch.ones(3)}, path, replace=False)

    def dies_halfway(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    def disk_full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    for save, raises in ((dies_halfway, KeyboardInterrupt), (disk_full, D.UserError)):
        monkeypatch.setattr(torch, "save", save)
        with pytest.raises(raises, match=str(path) if raises is D.UserError else None):
            D.atomic_save({"v": torch.zeros(3)}, path, replace=True)
        monkeypatch.undo()
        assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
        assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

@pytest.mark.parametrize("args,flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "1e300"], "--lr"), (["--epochs", "0"], "--epochs"),
    (["--channels", "12,16"], "--channels"), (["--channels", "8,x"], "--channels"),
    (["--digit", "12"], "--digit"),
    (["--ckpt", "afile/m.pt"], "--ckpt"), (["--ckpt", "."], "--ckpt"), (["--ckpt", ""], "--ckpt"),
    (["--seed", "1.5"], "--seed"), (["--batch-size", "-1"], "--batch-size"),
])
def test_bad_train_arguments_stop_it_before_any_work(args, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(D, "load_mnist", lambda *a: pytest.fail("the data was loaded"))
    refused(["train", "--ckpt", "new/x.pt", *TINY, *args], capsys, flag)
    assert not (tmp_path / "new").exists()

def test_timesteps_0_based_ddim_spacing_eta_and_ddpm_as_ddim():
    s, x, y = D.make_schedule("linear", 20), torch.randn(2, 1, 4, 4), torch.tensor([1, 2])
    visited = []
    for call in (lambda e: D.ddpm_sample(e, s, x, gen=torch.Generator()),
                 lambda e: D.ddim_sample(e, s, x, range(19, -1, -1), [0.0] * 20)):
        spy = Spy()
        call(D.make_eps_model(spy, y, 0, "fp32", s.alphas_bar))
        visited.append([int(t[0]) for t in spy.ts])
    assert visited[0] == visited[1] == list(range(19, -1, -1))
    e = D.make_eps_model(tiny_model(), y, 0.5, "fp32", s.alphas_bar)
    ts = D.ddim_timesteps(s.alphas_bar, 10)[0]
    x_T = torch.randn(2, 1, 28, 28)
    runs = [D.ddim_sample(e, s, x_T, ts, [eta] * 10, gen=torch.Generator().manual_seed(g))
            for eta in (0, 1) for g in (1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[2], runs[3])   # eta 0: no noise
    # DDIM's own steps start at sigma_max, are even in log SNR, eta 1 only where noisiest.
    ab = D.make_schedule("cosine", 1000).alphas_bar
    ts, etas = D.ddim_timesteps(ab, 20)
    log_snr, sigma = D.snr(ab.double()).log(), ((1 - ab) / ab).sqrt()
    assert sigma[ts[0]] <= D.MAX_NOISE_RATIO < sigma[ts[0] + 1] and ts[-1] == 0
    gaps = -log_snr[ts].diff()
    assert gaps.max() / gaps.min() < 1.6                    # even, up to whole timesteps
    k = int((ab[ts] < D.NOISY_BELOW).sum())
    assert etas == [1.0] * k + [D.ETA_LATER] * (20 - k) and 0 < k < 10
    for T, steps in ((20, 19), (1000, 300)):                # more steps than distinct nearest t
        ts = D.ddim_timesteps(D.make_schedule("cosine", T).alphas_bar, steps)[0]
        assert len(set(ts)) == steps and ts == sorted(ts, reverse=True) and ts[-1] == 0
    s, m = D.make_schedule("linear", 30), tiny_model()     # DDIM with eta 1 on all T steps: DDPM
    x_T, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, D.NULL_LABEL])
    e = D.make_eps_model(m, y, 1.5, "fp32", s.alphas_bar)
    a = D.ddpm_sample(e, s, x_T, gen=torch.Generator().manual_seed(9))
    ts, etas = D.ddim_timesteps(s.alphas_bar, 30, even_in_t=True)
    b = D.ddim_sample(e, s, x_T, ts, etas, gen=torch.Generator().manual_seed(9))
    assert a.abs().max() > 0.1 and (a - b).abs().max() <= 1e-4

@pytest.mark.parametrize("sampler", ["ddpm", "ddim eta 0", "ddim default", "ddim even in t"])
def test_samplers_reproduce_gaussian_data(sampler):
    # Data N(0, sd^2 I) has a known exact eps; every sampler must give back std sd
    # (sd small enough that the clip of x_start_hat to [-1, 1] never bites).
    sd, s = 0.25, D.make_schedule("cosine", 1000)
    ab = s.alphas_bar.double()      # E[eps | x_t] = sqrt(1 - ab) x_t / (ab sd^2 + 1 - ab)
    m = lambda x, t: ((1 - ab[t]).sqrt() * x / (ab[t] * sd ** 2 + 1 - ab[t])).float()
    ts, etas = D.ddim_timesteps(s.alphas_bar, 100, even_in_t=sampler == "ddim even in t")
    x_T = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    if sampler == "ddpm":
        x = D.ddpm_sample(m, s, x_T, gen=gen)
    else:
        etas = etas if sampler == "ddim default" else [0.0] * 100   # eta 1 in few steps blurs
        x = D.ddim_sample(m, s, x_T, ts, etas, gen=gen)
    assert x.std().item() == pytest.approx(sd, rel=0.03) and abs(x.mean().item()) < 0.01

def test_seeded_sampling_and_random_digits():
    s, m, labels = D.make_schedule("cosine", 50), tiny_model(), torch.arange(150) % 10
    how = D.choose_sampler(True, s, steps=5)
    a, b, c = (D.generate(m, s, labels, how, seed=seed) for seed in (3, 3, 4))
    assert a.shape == (150, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(D.random_digits(60000, seed=0), minlength=10)   # MNIST's p(y)
    assert (counts / 60000 - torch.tensor(D.MNIST_COUNTS) / 60000).abs().max() < 0.005
    assert torch.equal(D.random_digits(50, 1), D.random_digits(50, 1))

def test_guidance_and_the_unconditional_model(trained, tmp_path, monkeypatch, capsys):
    # v is 1 with a label, -1 without: (1 + w) 1 - w (-1) = 1 + 2 w; eps = v where ab = 1
    two_faced = lambda x, t, y: torch.where(y == D.NULL_LABEL, -1.0, 1.0).view(-1, 1, 1, 1)
    x, y, ones = torch.zeros(2, 1, 3, 3), torch.tensor([3, 4]), torch.ones(10)
    assert (D.make_eps_model(two_faced, y, 2.0, "fp32", ones)(x, 5) == 5).all()
    assert (D.make_eps_model(two_faced, y, 0.0, "fp32", ones)(x, 5) == 1).all()
    spy, real = [], D.make_eps_model
    monkeypatch.setattr(D, "make_eps_model", lambda m, y, w, *a: spy.append((y, w)) or real(m, y, w, *a))
    for flags, uncond in (([], False), (["--uncond"], True)):
        assert run(["sample", "--ckpt", trained, "--n", 5, "--out", tmp_path / "u.png", *flags],
                   capsys)[0] == 0
        assert all((y == D.NULL_LABEL).all() == uncond and w == D.GUIDANCE * (not uncond) for y, w in spy)
        spy.clear()

def test_sample_pictures_ddpm_and_the_default_checkpoint(trained, tmp_path, monkeypatch, capsys):
    pictures = ["--out", tmp_path / "deep" / "g.png", "--trajectory", tmp_path / "t.png"]
    code, out, err = run(["sample", "--ckpt", trained, "--n", 6, "--steps", 5, "--digit", 7,
                          *pictures], capsys)
    assert code == 0 and (tmp_path / "deep" / "g.png").is_file() and (tmp_path / "t.png").is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "SHIPPED", trained)
    assert str(trained) in run(["sample", "--n", 1, "--steps", 1], capsys)[1]
    (tmp_path / "ddpm_mnist.pt").write_bytes(trained.read_bytes())
    assert "checkpoint: ddpm_mnist.pt" in run(["sample", "--n", 1, "--steps", 1], capsys)[1]
    # as a script, as a learner runs it, with DDPM's all T steps
    argv = ["sample", "--ckpt", trained, "--n", 1, "--steps", 1000, "--out", tmp_path / "x.png"]
    proc = subprocess.run([sys.executable, D.__file__, *map(str, argv)], capture_output=True)
    assert proc.returncode == 0 and (tmp_path / "x.png").is_file(), proc.stderr

def test_bad_checkpoints(trained, tmp_path, capsys):
    ckpt = torch.load(trained, weights_only=True)
    bad = {"missing.pt": None, "trunc.pt": trained.read_bytes()[:5000],
           "other.pt": {"weights": torch.ones(2)},
           "mismatch.pt": {**ckpt, "config": {**ckpt["config"], "channels": [16, 32]}},
           "code.pt": {"config": {}, "ema": Spy()},    # an object: weights_only refuses it
           "older.pt": {k: v for k, v in ckpt.items() if k != "predicts"}}   # of eps
    for name, content in bad.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            torch.save(content, tmp_path / name)
        refused(["sample", "--ckpt", tmp_path / name, "--out", tmp_path / "new/x.png"], capsys, name)
    refused(["sample", "--ckpt", ""], capsys, "checkpoint")
    assert not (tmp_path / "new").exists()

@pytest.mark.parametrize("args,flag", [
    (["--digit", 12], "--digit"), (["--digit", "7.0"], "7.0"), (["--digit", "-1"], "--digit"),
    (["--n", 0], "--n"), (["--n", "1e14"], "--n"), (["--steps", 0], "--steps"),
    (["--steps", 1001], "--steps"), (["--eta", 2], "--eta"), (["--eta", "nan"], "--eta"),
    (["--steps", 1000, "--eta", 0.5], "--steps"), (["--guidance", "1e300"], "--guidance"),
    (["--uncond", "--guidance", 2], "--guidance"), (["--uncond", "--digit", 3], "--uncond"),
    (["--trajectory", "t.xyz"], "--trajectory"), (["--out", "afile/g.png"], "--out"),
    (["--out", "x.jpg"], "--out"), (["--out", "."], "--out"), (["--out", ""], "--out"),
    (["--seed", "x"], "--seed"),
])
def test_bad_sample_arguments(args, flag, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(D, "generate", lambda *a: pytest.fail("sampled before checking"))
    out = tmp_path / "new" / "x.png"
    refused(["sample", "--ckpt", trained, "--out", out, *args], capsys, flag)
    assert not (tmp_path / "new").exists() and (tmp_path / "afile").is_file()

def test_the_device_and_bf16_by_the_hardware_only(monkeypatch):
    for cuda, mps, name in ((False, False, "cpu"), (True, False, "cuda"), (False, True, "mps")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        for avx512, amx in ((False, False), (True, False), (False, True)):   # CPUs: either unit
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (7 + amx, 0))
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
            bf16 = {"cpu": avx512 or amx, "cuda": amx, "mps": False}[name]  # CUDA: from 8.0 on
            assert D.setup_device() == (torch.device(name), "bf16" if bf16 else "fp32")

META = torch.device("meta")

class MetaDevice(TorchDispatchMode):
    """The meta device as a GPU: raises where a CPU tensor meets it; counts syncs and float64."""
    float64, syncs = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and src.device.type == "meta":
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs += 1
                return True if src.dtype == torch.bool else 0
            if func is torch.ops.aten._to_copy.default and kwargs.get("device", META).type == "cpu":
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        out = func(*args, **kwargs)
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and o.device.type == "meta" and o.dtype == torch.float64:
                self.float64 = self.float64 + [func]
        return out

def test_training_sampling_and_evaluation_on_a_device():
    with MetaDevice() as mode:
        s = D.make_schedule("cosine", 8)
        model, ema = tiny_model().to(META).train(), tiny_model().to(META)
        opts = D.make_optimizers(model, 1e-3)
        cfg = dict(epochs=1, batch_size=4, lr=1e-3)
        x0, y = torch.zeros(4, 1, 28, 28, device=META), torch.tensor([1, 2, 3, 4], device=META)
        gen = torch.Generator().manual_seed(0)
        next(D.train_loop(model, ema, opts, x0, y, s.to(META), cfg, gen, "fp32"))
        assert mode.syncs == 0                                # the CPU never waits for it
        for how in (D.choose_sampler(True, s, steps=8), D.choose_sampler(True, s),
                    D.choose_sampler(False, s)):
            D.generate(ema.eval(), s, torch.tensor([1, 2, D.NULL_LABEL]), how)
        D.classify(D.classifier().to(META), torch.zeros(4, 1, 28, 28))
    assert not mode.float64, mode.float64

def test_fid_evaluate_and_forward(trained, mnist_dir, tmp_path, monkeypatch, capsys):
    x = torch.randn(4000, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
    x -= x.mean(0)
    assert abs(D.fid(x, x)) < 1e-6
    assert D.fid(x, x + 1) == pytest.approx(5, rel=1e-6)       # a shifted mean: |mu1 - mu2|^2
    # S2 = 4 S1: tr(S1 + S2 - 2 (S1 S2)^(1/2)) = (1 + 4 - 2 * 2) tr(S1)
    assert D.fid(x, 2 * x) == pytest.approx(torch.cov(x.T).trace().item(), rel=1e-6)
    ckpt, sizes, real_fid = torch.load(trained, weights_only=True), [], D.fid
    d1 = tmp_path / "d1.pt"                                # a model of 1s alone
    torch.save({**ckpt, "config": {**ckpt["config"], "digit": 1}}, d1)

    def spied(a, b):
        sizes.append((len(a), len(b)))
        return real_fid(a, b)
    monkeypatch.setattr(D, "fid", spied)
    args = ["evaluate", "--ckpt", trained, "--data-dir", mnist_dir, "--n", 20, "--steps", 3]
    for mode in ([], ["--uncond"], ["--ckpt", d1]):
        code, out, err = run([*args, *mode], capsys)
        assert code == 0 and "FID" in out and "floor" in out, err
    ones = [int((D.load_mnist(mnist_dir, train)[1] == 1).sum()) for train in (True, False)]
    # the floor and the samples against all 100 test images, or a 1s model's test 1s
    assert sizes == [(20, 100)] * 4 + [(ones[0], ones[1]), (20, ones[1])]
    assert run(["forward", "--data-dir", mnist_dir, "--out", tmp_path / "f.png"], capsys)[0] == 0
