"""Tests for ddpm_mnist.py, offline, in seconds: a tiny MNIST in the real IDX format (torchvision's own reader
reads it) and tiny U-Nets. Each asserts a property that fails if the method is wrong."""

import contextlib
import io
import math
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm_mnist as D

TINY = ["--channels", "8,8,16", "--timesteps", "10", "--batch-size", "64"]

def write_idx(path, arr):
    """The IDX format MNIST ships in: magic (0x08 = uint8, then ndim), dims, bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    path.write_bytes(struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())

@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """256 training and 100 test images a classifier can tell apart: digit d is a bright bar at column 3 + 2d."""
    root = tmp_path_factory.mktemp("data")
    (root / "MNIST" / "raw").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 100)):
        labels, images = rng.integers(0, 10, n), rng.integers(0, 40, (n, 28, 28))
        for i, d in enumerate(labels):
            images[i, 4:24, 3 + 2 * d:6 + 2 * d] = 255
        write_idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels)
    return root

@pytest.fixture(scope="session")
def trained(mnist_dir, tmp_path_factory):
    """A tiny model trained one epoch (4 steps) by the CLI, beside a killed save's .tmp and a glob look-alike."""
    ckpt = tmp_path_factory.mktemp("trained") / "m[1].pt"
    (ckpt.parent / "m[1].pt.abc123.tmp").write_bytes(b"left by a kill -9")
    (ckpt.parent / "m1.pt.abc123.tmp").write_bytes(b"not ours")
    D.main(["train", "--data-dir", str(mnist_dir), "--epochs", "1", "--ckpt", str(ckpt), *TINY])
    return ckpt

def run(argv, capsys):
    """The CLI in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        D.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())

def assert_one_line_error(code, err, *names):
    """A non-zero exit and one line, no traceback, naming what was wrong."""
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert all(n.lower() in lines[0].lower() for n in names), lines[0]

def tiny_model():
    torch.manual_seed(0)
    m = D.UNet((8, 16)).eval()
    for p in (m.out_conv.weight, *(b.conv2.weight for b in m.down)):   # zero-init: wake the output up
        torch.nn.init.normal_(p, std=0.3)
    return m

def exact_gaussian_eps(alphas_bar, sd):
    """The exact noise predictor E[eps | x_t] for data N(0, sd^2 I): sqrt(1 - ab) x_t / (ab sd^2 + 1 - ab)."""
    def eps(x, t):
        ab = alphas_bar.double()[t]
        return ((1 - ab).sqrt() * x / (ab * sd ** 2 + 1 - ab)).float()
    return eps

class Spy(torch.nn.Module):
    """Records the t and y the network is called with; predicts zero noise."""
    ts, ys = [], []

    def forward(self, x, t, y):
        self.ts, self.ys = self.ts + [t], self.ys + [y]
        return torch.zeros_like(x)


# --- 1-2. data, schedules, q(x_t | x_0) -----------------------------------------

def test_load_mnist_range_digit_limit_and_bad_files(mnist_dir, tmp_path, monkeypatch, capsys):
    x, y = D.load_mnist(mnist_dir)
    assert x.shape == (256, 1, 28, 28) and x.min() == -1 and x.max() == 1
    ones, y1 = D.load_mnist(mnist_dir, digit=1, limit=5)
    assert (y1 == 1).all() and torch.equal(ones, D.load_mnist(mnist_dir, digit=1)[0][:5])   # the first 5 ones
    # Files whose counts disagree, and no files at all, are one line each.
    shutil.copytree(mnist_dir / "MNIST" / "raw", tmp_path / "MNIST" / "raw")
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(255))   # one label short
    code, _, err = run(["train", "--data-dir", tmp_path, "--ckpt", tmp_path / "m.pt", *TINY], capsys)
    assert_one_line_error(code, err, "train-images-idx3-ubyte")
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    code, _, err = run(["train", "--data-dir", tmp_path / "empty", "--ckpt", tmp_path / "m.pt", *TINY], capsys)
    assert_one_line_error(code, err, str(tmp_path / "empty" / "MNIST" / "raw"))

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_and_q_sample(name):
    s = D.make_schedule(name, 1000)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all() and (s.alphas_bar.diff() < 0).all()
    assert s.alphas_bar[0] > 0.999 and s.alphas_bar[-1] < 1e-3 and s.posterior_variance[0] == 0
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = {"linear": (1e-4, 0.02), "cosine": (1 - f(1) / f(0), 0.999)}[name]
    assert s.betas[0].item() == pytest.approx(expected[0], rel=1e-4) and s.betas[-1].item() == pytest.approx(expected[1])
    assert torch.allclose(s.alphas_bar, torch.cumprod(1 - s.betas.double(), 0).float())
    assert name == "linear" or s.alphas_bar[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)
    for t in (0, 300, 999):                                       # the statistics of q(x_t | x_0)
        x0 = torch.full((20000, 1, 2, 2), 0.5)
        x_t = D.q_sample(x0, torch.full((20000,), t), torch.randn(x0.shape), s.alphas_bar)
        ab = s.alphas_bar[t].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), abs=0.01)


# --- 4. loss and training ---------------------------------------------------------

def test_loss_oracle_its_draws_and_the_untrained_network():
    # For x_0 = 0, x_t = sqrt(1 - ab) eps, so x_t / sqrt(1 - ab) is the exact noise: zero loss.
    s = D.make_schedule("cosine", 50)
    exact = lambda x_t, t, y: x_t / (1 - s.alphas_bar[t]).sqrt().view(-1, 1, 1, 1)
    x0, y = torch.zeros(64, 1, 4, 4), torch.zeros(64, dtype=torch.long)
    assert D.diffusion_loss(exact, x0, y, s, torch.Generator().manual_seed(0)).item() < 1e-10
    # A predictor of x_0 (here 0) is the wrong target: its loss is the mean weight, far from 0.
    clean = lambda x_t, t, y: torch.zeros_like(x_t)
    assert D.diffusion_loss(clean, x0, y, s, torch.Generator().manual_seed(0)).item() > 0.3
    # It draws t from 0 to T-1 and drops the label 20% of the time.
    spy, s = Spy(), D.make_schedule("linear", 10)
    D.diffusion_loss(spy, torch.zeros(4000, 1, 2, 2), torch.full((4000,), 3), s, torch.Generator().manual_seed(0))
    t, y = spy.ts[0], spy.ys[0]
    assert t.min() == 0 and t.max() == 9 and len(t.unique()) == 10
    assert set(y.unique().tolist()) == {3, D.NULL_LABEL}
    assert (y == D.NULL_LABEL).float().mean().item() == pytest.approx(D.P_UNCOND, abs=0.02)
    m, x = D.UNet((8, 16, 32)), torch.randn(3, 1, 28, 28)                # the untrained U-Net predicts eps = 0
    assert m(x, torch.tensor([0, 10, 999]), torch.tensor([0, 9, D.NULL_LABEL])).abs().max() == 0

def test_train_writes_a_small_final_checkpoint_and_a_grid_and_never_replaces_it(trained, mnist_dir, capsys):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["channels"] == [8, 8, 16] and "optimizer" not in ckpt
    assert all(v.dtype == torch.float16 for v in ckpt["ema"].values())
    assert (trained.parent / "m[1]_epoch01.png").is_file()
    assert [p.name for p in trained.parent.glob("*.tmp")] == ["m1.pt.abc123.tmp"]   # the stale one is gone
    before = trained.read_bytes()
    assert_one_line_error(*run(["train", "--data-dir", mnist_dir, "--ckpt", trained, *TINY], capsys)[::2], "--resume")
    assert trained.read_bytes() == before                                         # never replaced unasked

def test_resume_after_a_kill_matches_an_uninterrupted_run(mnist_dir, tmp_path, monkeypatch, capsys):
    common = ["train", "--data-dir", mnist_dir, "--epochs", 2, "--precision", "fp32", *TINY]
    monkeypatch.setattr(D, "generate", lambda m, s, labels, *a, **k: torch.zeros(len(labels), 1, 28, 28))   # no grids
    assert run([*common, "--ckpt", tmp_path / "straight.pt"], capsys)[0] == 0
    real_loss, calls = D.diffusion_loss, []

    def killed_at_step_6(*a):   # 4 steps per epoch: killed in epoch 2
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_loss(*a)
    monkeypatch.setattr(D, "diffusion_loss", killed_at_step_6)
    assert run([*common, "--ckpt", tmp_path / "resumed.pt"], capsys)[0] not in (0, None)
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 4       # epoch 1 intact
    monkeypatch.setattr(D, "diffusion_loss", real_loss)
    # Refused: a flag unlike the checkpoint's, even a default (all of `common` agree), and a checkpoint without rng.
    code, _, err = run([*common, "--resume", "--ckpt", tmp_path / "resumed.pt", "--channels", "32,64,128"], capsys)
    assert_one_line_error(code, err, "--channels")
    torch.save({k: v for k, v in torch.load(tmp_path / "resumed.pt", weights_only=True).items() if k != "rng"},
               tmp_path / "damaged.pt")
    with monkeypatch.context() as m:
        m.setattr(D, "load_mnist", lambda *a: pytest.fail("the data was loaded"))
        assert_one_line_error(*run([*common, "--resume", "--ckpt", tmp_path / "damaged.pt"], capsys)[::2], "rng")
    assert run([*common, "--resume", "--ckpt", tmp_path / "resumed.pt"], capsys)[0] == 0
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("straight.pt", "resumed.pt"))
    assert a["step"] == b["step"] == 8 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert run([*common, "--resume", "--ckpt", tmp_path / "resumed.pt"], capsys)[0] == 0      # finished: nothing to do

def test_a_nan_loss_stops_with_the_step_and_saves_are_atomic(mnist_dir, tmp_path, monkeypatch, capsys):
    real_loss, calls = D.diffusion_loss, []

    def nan_at_step_3(*a):
        calls.append(1)
        return real_loss(*a) * (float("nan") if len(calls) == 3 else 1)
    monkeypatch.setattr(D, "diffusion_loss", nan_at_step_3)
    code, _, err = run(["train", "--data-dir", mnist_dir, "--ckpt", tmp_path / "n.pt", *TINY], capsys)
    assert_one_line_error(code, err, "nan", "step 3")
    assert not (tmp_path / "n.pt").exists()
    monkeypatch.undo()                                  # and a save that dies halfway leaves the last one whole
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
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".tmp")) == ["c.pt"]

@pytest.mark.parametrize("args,flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--channels", "12,16"], "--channels"),
    (["--channels", "8,x"], "--channels"), (["--timesteps", "1"], "--timesteps"), (["--digit", "12"], "--digit"),
    (["--schedule", "quadratic"], "--schedule"), (["--ckpt", "afile/m.pt"], "--ckpt"), (["--ckpt", "."], "--ckpt"),
    (["--epochs", "0"], "--epochs"), (["--seed", 10 ** 23], "--seed"), (["--timesteps", 10 ** 13], "--timesteps"),
    (["--lr", "1e300"], "--lr"),
])
def test_bad_train_arguments_stop_it_before_any_work(args, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(D, "load_mnist", lambda *a: pytest.fail("the data was loaded"))
    code, _, err = run(["train", "--ckpt", "new/x.pt", *TINY, *args], capsys)
    assert_one_line_error(code, err, flag)
    assert not (tmp_path / "new").exists()                  # nothing left behind, not even a folder


# --- 5-6. samplers --------------------------------------------------------------------

def test_timesteps_0_based_ddim_spacing_and_eta():
    s, x, y = D.make_schedule("linear", 20), torch.randn(2, 1, 4, 4), torch.tensor([1, 2])
    visited = []
    for call in (lambda e: D.ddpm_sample(e, s, x, gen=torch.Generator()),
                 lambda e: D.ddim_sample(e, s, x, range(19, -1, -1), [0.0] * 20)):
        spy = Spy()
        call(D.guided(spy, y, 0, "fp32"))
        visited.append([int(t[0]) for t in spy.ts])
    assert visited[0] == visited[1] == list(range(19, -1, -1))
    e, ts, x_T = D.guided(tiny_model(), y, 0.5, "fp32"), D.ddim_timesteps(s.alphas_bar, 10)[0], torch.randn(2, 1, 28, 28)
    runs = [D.ddim_sample(e, s, x_T, ts, [eta] * 10, gen=torch.Generator().manual_seed(g)) for eta in (0, 1) for g in (1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[2], runs[3])   # eta 0 draws no noise
    # DDIM's own timesteps start at sigma_max, are even in log SNR, with eta 1 only on the first, noisiest.
    ab = D.make_schedule("cosine", 1000).alphas_bar
    (ts, etas), log_snr, sigma = D.ddim_timesteps(ab, 20), (ab / (1 - ab)).double().log(), ((1 - ab) / ab).sqrt()
    assert sigma[ts[0]] <= D.SIGMA_MAX < sigma[ts[0] + 1] and ts[-1] == 0
    gaps = -log_snr[ts].diff()
    assert gaps.max() / gaps.min() < 1.6                     # even in log SNR, up to whole timesteps
    k = int((ab[ts] < D.NOISY_BELOW).sum())
    assert etas == [1.0] * k + [D.ETA_LATER] * (20 - k) and 0 < k < 10   # most fresh noise in the noisiest steps
    for T, steps in ((20, 19), (1000, 300)):                 # more steps than distinct nearest timesteps
        ts = D.ddim_timesteps(D.make_schedule("cosine", T).alphas_bar, steps)[0]
        assert len(set(ts)) == steps and ts == sorted(ts, reverse=True) and ts[-1] == 0

@pytest.mark.parametrize("clip", [True, False])
def test_ddim_with_eta_1_and_all_steps_is_ddpm(clip):
    s, m = D.make_schedule("linear", 30), tiny_model()
    x_T, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, D.NULL_LABEL])
    e = D.guided(m, y, 1.5, "fp32")
    a = D.ddpm_sample(e, s, x_T, clip=clip, gen=torch.Generator().manual_seed(9))
    b = D.ddim_sample(e, s, x_T, *D.ddim_timesteps(s.alphas_bar, 30, True), clip=clip, gen=torch.Generator().manual_seed(9))
    assert a.abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())   # unclipped, x can reach thousands

@pytest.mark.parametrize("sampler", ["ddpm", "ddim eta 0", "ddim default", "ddim even in t"])
def test_samplers_reproduce_gaussian_data(sampler):
    # Data N(0, sd^2 I) has a known exact eps; every sampler must give back samples of std sd.
    sd, s = 0.5, D.make_schedule("cosine", 200)
    m = exact_gaussian_eps(s.alphas_bar, sd)
    ts, etas = D.ddim_timesteps(s.alphas_bar, 100, even_in_t=sampler == "ddim even in t")   # --uncond's steps
    x_T, gen = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1)
    etas = etas if sampler == "ddim default" else [0.0] * 100   # eta 1 in few steps blurs: see DDPM
    x = D.ddpm_sample(m, s, x_T, clip=False, gen=gen) if sampler == "ddpm" else \
        D.ddim_sample(m, s, x_T, ts, etas, clip=False, gen=gen)
    assert x.std().item() == pytest.approx(sd, rel=0.03) and abs(x.mean().item()) < 0.02

def test_seeded_sampling_and_random_digits():
    s, m, labels = D.make_schedule("cosine", 50), tiny_model(), torch.tensor([0, 1, 2, 3, 4])
    how = D.choose_sampler(True, s, steps=5)
    a, b, c = (D.generate(m, s, labels, how, seed=seed, batch_size=2) for seed in (3, 3, 4))
    assert a.shape == (5, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(D.random_digits(60000, seed=0), minlength=10)   # random digits follow MNIST's p(y)
    assert (counts / 60000 - torch.tensor(D.MNIST_COUNTS) / 60000).abs().max() < 0.005
    assert torch.equal(D.random_digits(50, 1), D.random_digits(50, 1))
    assert not torch.equal(D.random_digits(50, 1), D.random_digits(50, 2))
    assert (D.random_digits(20, 0, digit=4) == 4).all()                         # a --digit model knows one

def test_classifier_free_guidance_and_the_unconditional_model(trained, tmp_path, monkeypatch, capsys):
    two_faced = lambda x, t, y: torch.where((y == D.NULL_LABEL).view(-1, 1, 1, 1), -1.0, 1.0).expand_as(x)
    x, y = torch.zeros(2, 1, 3, 3), torch.tensor([3, 4])
    assert torch.equal(D.guided(two_faced, y, 2.0, "fp32")(x, 5), torch.full_like(x, 3 * 1 - 2 * -1))
    assert torch.equal(D.guided(two_faced, y, 0.0, "fp32")(x, 5), torch.ones_like(x))
    spy, real = [], D.guided
    monkeypatch.setattr(D, "guided", lambda m, y, w, p: spy.append((y.clone(), w)) or real(m, y, w, p))
    assert run(["sample", "--ckpt", trained, "--uncond", "--n", 5, "--out", tmp_path / "u.png"], capsys)[0] == 0
    assert all((y == D.NULL_LABEL).all() and w == 0 for y, w in spy)
    spy.clear()
    assert run(["sample", "--ckpt", trained, "--n", 5, "--out", tmp_path / "r.png"], capsys)[0] == 0
    assert all((y != D.NULL_LABEL).all() and w == D.GUIDANCE for y, w in spy)   # the default: random digits


# --- 7-9. the sample command, devices, evaluation and the forward picture ----------------------

def test_sample_outputs_a_pipe_a_closed_stdin_and_the_default_checkpoint(trained, tmp_path, monkeypatch, capsys):
    code, out, err = run(["sample", "--ckpt", trained, "--n", 6, "--steps", 5, "--prompt", " Seven ",
                          "--out", tmp_path / "deep" / "g.png", "--out-dir", tmp_path / "each",
                          "--trajectory", tmp_path / "t.png", "--gif", tmp_path / "r.gif"], capsys)
    assert code == 0, err
    assert all((tmp_path / f).is_file() for f in ("deep/g.png", "t.png")) and Image.open(tmp_path / "r.gif").n_frames > 2
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    assert run(["sample", "--ckpt", trained, "--per-class", 2, "--steps", 2, "--out", tmp_path / "pc.png"], capsys)[0] == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("7\nSeven\nbanana\n three\n\nnine\n"))
    code, _, err = run(["sample", "--interactive", "--ckpt", trained, "--out", tmp_path / "p_{digit}.png"], capsys)
    assert code == 0 and (tmp_path / "p_7.png").is_file() and (tmp_path / "p_3.png").is_file()
    assert not (tmp_path / "p_9.png").exists() and "banana" in err   # the empty line ended it
    monkeypatch.setattr(sys, "stdin", None)
    code, _, err = run(["sample", "--ckpt", trained, "--interactive", "--out", tmp_path / "p.png"], capsys)
    assert_one_line_error(code, err, "standard input")
    proc = subprocess.Popen([sys.executable, D.__file__, "sample", "--ckpt", trained, "--n", "1", "--steps", "1",
                             "--out", tmp_path / "x.png"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                                                    # as `| head -0` would
    assert proc.wait(timeout=60) != 0 and b"Traceback" not in proc.stderr.read()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "SHIPPED", trained)
    assert str(trained) in run(["sample", "--n", 1, "--steps", 1], capsys)[1]
    (tmp_path / "ddpm_mnist.pt").write_bytes(trained.read_bytes())
    assert "checkpoint: ddpm_mnist.pt" in run(["sample", "--n", 1, "--steps", 1], capsys)[1]

@pytest.mark.parametrize("word,digit", [("7", 7), ("seven", 7), (" SEVEN \n", 7), ("zero", 0), ("eleven", None),
                                        ("77", None), ("-1", None), ("", None), ("7.0", None)])
def test_prompts(word, digit):
    with pytest.raises(D.UserError) if digit is None else contextlib.nullcontext():
        assert D.parse_prompt(word) == digit

def test_bad_checkpoints(trained, tmp_path, capsys):
    ckpt = torch.load(trained, weights_only=True)
    bad = {"missing.pt": None, "trunc.pt": trained.read_bytes()[:5000], "other.pt": {"weights": torch.ones(2)},
           "noschedule.pt": {**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "schedule"}},
           "mismatch.pt": {**ckpt, "config": {**ckpt["config"], "channels": [16, 32]}},
           "nan.pt": {**ckpt, "ema": {**ckpt["ema"], "out_conv.bias": torch.full((1,), float("nan"))}},
           "noconfig.pt": {**ckpt, "config": None}, "digit12.pt": {**ckpt, "config": {**ckpt["config"], "digit": 12}},
           **{f"t{i}.pt": {**ckpt, "config": {**ckpt["config"], "timesteps": t}} for i, t in enumerate(("20", -5))},
           "code.pt": {"format": "ddpm_mnist", "config": {}, "ema": Spy()}}    # an object: weights_only refuses it
    for name, content in bad.items():
        if content is not None:
            (tmp_path / name).write_bytes(content) if isinstance(content, bytes) else torch.save(content, tmp_path / name)
        code, _, err = run(["sample", "--ckpt", tmp_path / name, "--out", tmp_path / "new" / "x.png"], capsys)
        assert_one_line_error(code, err, name)
    assert not (tmp_path / "new").exists()

@pytest.mark.parametrize("args,flag", [
    (["--digit", 12], "--digit"), (["--n", 0], "--n"), (["--steps", 0], "--steps"), (["--steps", 21], "--steps"),
    (["--prompt", "eleven"], "eleven"), (["--eta", 2], "--eta"), (["--eta", "nan"], "--eta"),
    (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"), (["--sampler", "euler"], "--sampler"),
    (["--sampler", "ddpm", "--steps", 5], "--steps"), (["--digit", 3, "--prompt", "seven"], "--prompt"),
    (["--per-class", 2, "--digit", 3], "--digit"), (["--uncond", "--digit", 3], "--uncond"),
    (["--gif", "x.png"], "--gif"), (["--trajectory", "t.xyz"], "--trajectory"), (["--out", "afile/g.png"], "--out"),
    (["--per-class", 0], "--per-class"), (["--uncond", "--guidance", 2], "--guidance"), (["--out", "x.xbm"], "--out"),
    (["--interactive", "--gif", "r.gif"], "--interactive"), (["--seed", 10 ** 23], "--seed"),
    (["--n", 10 ** 14], "--n"), (["--guidance", "1e300"], "--guidance"), (["--out", "d{digit}.png"], "{digit}"),
    (["--per-class", 2, "--n", 5], "--n"), (["--interactive", "--out", "{digit}/p.png"], "{digit}"),
    (["--trajectory", "OUT"], "--trajectory"), (["--out", "."], "--out"), (["--gif", "afile/r.gif"], "--gif"),
    (["--out-dir", "afile"], "--out-dir"), (["--trajectory", "."], "--trajectory"),
])
def test_bad_sample_arguments(args, flag, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(D, "generate", lambda *a, **k: pytest.fail("sampled before checking the arguments"))
    out = tmp_path / "new" / "x.png"
    code, _, err = run(["sample", "--ckpt", trained, "--out", out, *[out if a == "OUT" else a for a in args]], capsys)
    assert_one_line_error(code, err, flag)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob("*.png")) and (tmp_path / "afile").is_file()

@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_nan_samples_are_reported_not_drawn(command, trained, mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "guided", lambda *a: lambda x, t: torch.full_like(x, float("nan")))
    extra = ["--data-dir", mnist_dir, "--classifier", tmp_path / "clf.pt", "--n", 20] if command == "evaluate" else []
    code, _, err = run([command, "--ckpt", trained, "--steps", 2, "--out-dir", tmp_path / "each", *extra], capsys)
    assert_one_line_error(code, err, "nan")
    assert not (tmp_path / "each").exists()

def test_a_missing_gpu_and_auto_precision_depends_on_the_hardware_only(trained, monkeypatch, capsys):
    if not torch.cuda.is_available():
        assert_one_line_error(*run(["sample", "--ckpt", trained, "--device", "cuda"], capsys)[::2], "cuda")
    assert D.setup_device("cpu", "fp32")[1] == "fp32" and D.setup_device("cpu", "bf16")[1] == "bf16"
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert D.setup_device("cpu", "auto")[1] == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):   # bf16 units from Ampere on
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert D.setup_device("cuda", "auto")[1] == expected


META = torch.device("meta")

class MetaDevice(TorchDispatchMode):
    """The meta device as a GPU: it raises where a CPU tensor meets a meta one. This mode lets copies to the CPU
    and .item() through (zeros: checks pass), counting them and every float64 made on the device."""
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
        opt, cfg = torch.optim.AdamW(model.parameters(), lr=1e-3), dict(epochs=1, batch_size=4, lr=1e-3)
        x0, y = torch.zeros(4, 1, 28, 28, device=META), torch.tensor([1, 2, 3, 4], device=META)
        next(D.train_loop(model, ema, opt, x0, y, s.to(META), cfg, torch.Generator().manual_seed(0), "fp32"))
        assert mode.syncs == 0                                    # the CPU never waits for the device
        for how in (D.choose_sampler(True, s, "ddpm"), D.choose_sampler(True, s), D.choose_sampler(False, s)):
            D.generate(ema.eval(), s, torch.tensor([1, 2, D.NULL_LABEL]), how)
        D.classify(D.Classifier().to(META), torch.zeros(4, 1, 28, 28))
    assert not mode.float64, mode.float64


def test_fid_closed_forms_and_the_floor_has_the_same_digits():
    x = torch.randn(4000, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
    x -= x.mean(0)
    assert abs(D.fid(x, x)) < 1e-6
    assert D.fid(x, x + 1) == pytest.approx(5, rel=1e-6)         # a shifted mean: |mu1 - mu2|^2
    # S2 = 4 S1: tr(S1 + S2 - 2 (S1 S2)^(1/2)) = (1 + 4 - 2 * 2) tr(S1)
    assert D.fid(x, 2 * x) == pytest.approx(torch.cov(x.T).trace().item(), rel=1e-6)
    y_real, labels = torch.arange(300) % 10, torch.tensor([3, 3, 3, 7, 0, 9, 9])
    idx = D.same_digits(y_real, labels, torch.Generator().manual_seed(0))
    assert len(set(idx.tolist())) == len(idx) and sorted(y_real[idx].tolist()) == sorted(labels.tolist())

def test_evaluate_and_forward_run(trained, mnist_dir, tmp_path, monkeypatch, capsys):
    ckpt, sizes, real_fid = torch.load(trained, weights_only=True), [], D.fid
    torch.save({**ckpt, "config": {**ckpt["config"], "digit": 1}}, d1 := tmp_path / "d1.pt")   # a model of 1s alone
    monkeypatch.setattr(D, "fid", lambda a, b: sizes.append((len(a), len(b))) or real_fid(a, b))
    args = ["evaluate", "--ckpt", trained, "--data-dir", mnist_dir, "--classifier", tmp_path / "c.pt", "--n", 20]
    for mode in ([], ["--conditional"], ["--uncond"], ["--ckpt", d1], ["--ckpt", d1, "--uncond"]):
        code, out, err = run([*args, *mode], capsys)
        assert code == 0 and "FID" in out and "floor" in out, err
    ones = [int((D.load_mnist(mnist_dir, train)[1] == 1).sum()) for train in (True, False)]   # 19 < 20, and 8
    assert (tmp_path / "c.pt").is_file() and [b for _, b in sizes[:6]] == [100] * 6
    assert sizes[6:] == [(ones[0], ones[1]), (20, ones[1])] * 2   # 1s: against the test 1s, a floor of training 1s
    assert run(["forward", "--data-dir", mnist_dir, "--n", 3, "--out", tmp_path / "f.png"], capsys)[0] == 0
    for bad, flag in ((["forward", "--n", 0], "--n"), ([*args, "--n", 10 ** 14], "--n"), ([*args, "--seed", -1], "--seed"),
                      ([*args, "--ckpt", d1, "--conditional"], "1s"),    # a model of 1s alone draws only 1s
                      (["sample", "--ckpt", d1, "--digit", 7, "--out", tmp_path / "7.png"], "1s")):
        assert_one_line_error(*run(bad, capsys)[::2], flag)
