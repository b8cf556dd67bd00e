"""The application layer: device-correct noise, composed guidance, the source's guidance rule, run
metadata checks and the shape of the import graph (issue: one run module, one device path)."""
import ast
import json
import math
from pathlib import Path

import pytest
import torch

import diffusekit as dk
from diffusekit import editing
from diffusekit.device import randn, resolve_device
from diffusekit.guidance import (GradientGuidance, Guide, SourceGuidance, brightness_guide, color_guide,
                                 eps_scale_for_source, guided_denoiser, mean_intensity_loss)
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.pipeline import Pipeline
from diffusekit.samplers import Denoiser

SRC = Path(dk.__file__).parent
SCHED = dk.NoiseSchedule.create("linear", 1000)


def zero_eps(x, t, **cond):
    return torch.zeros_like(x)


# --- noise on the generator's device -------------------------------------------------------------

def test_noise_is_drawn_on_the_generator_device_then_moved(monkeypatch):
    # a "meta" tensor stands in for a CUDA one, and torch.randn is made as strict as it is on a GPU:
    # torch refuses randn(..., generator=cpu_generator, device="cuda"); here it refuses any mismatch
    real_randn = torch.randn

    def strict_randn(*args, generator=None, device=None, **kw):
        if generator is not None and device is not None and torch.device(device).type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real_randn(*args, generator=generator, device=device, **kw)
    monkeypatch.setattr(torch, "randn", strict_randn)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError):
        torch.randn(3, generator=g, device="meta")
    assert randn((2, 3), g, "meta").device.type == "meta"
    x = torch.empty(4, 1, 4, 4, device="meta")
    for name in ("ddpm", "euler_ancestral", "ddim"):
        out = dk.get_sampler(name, SCHED, eta=0.5) if name == "ddim" else dk.get_sampler(name, SCHED)
        assert out.sample(zero_eps, x, 3, generator=g).device.type == "meta"
    sampler = dk.get_sampler("ddim", SCHED)
    assert editing.sdedit(sampler, zero_eps, x, 0.5, 4, generator=g).device.type == "meta"
    mask = torch.ones(1, 1, 4, 4, device="meta")
    assert editing.inpaint(sampler, zero_eps, x, mask, 4, generator=g, resample=2).device.type == "meta"


def test_same_seed_same_images_whatever_the_device_of_the_noise():
    # CPU generator: the starting noise and step noise are the CPU draws, so image k is reproducible
    a = randn((2, 3), torch.Generator().manual_seed(5), "cpu")
    b = torch.randn((2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_pipeline_with_cpu_generator_matches_cpu():
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny8", num_classes=0))
    cpu = Pipeline(model, SCHED, image_shape=(1, 8, 8), device="cpu")
    gpu = Pipeline(UNet(model.config).cuda().load_state_dict(model.state_dict()) or model.cuda(), SCHED,
                   image_shape=(1, 8, 8), device="cuda")
    for name in ("ddpm", "dpmpp_2m"):
        a = cpu.sample(4, name, 10, generator=torch.Generator().manual_seed(1))
        b = gpu.sample(4, name, 10, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_device_auto_and_bad_device_messages():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(dk.ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(dk.ConfigError, match="fp16.*GPUs"):
        Pipeline(zero_eps, SCHED, image_shape=(1, 4, 4), device="cpu", precision="fp16")


# --- composed guidance ----------------------------------------------------------------------------

def test_source_rule_equals_eps_form_at_the_converted_scale():
    # linear loss L(x) = c * sum(x): constant gradient, and with eps = 0 the denoiser's x0_pred = x_t / sqrt(abar)
    c, s = 0.3, 0.7
    loss = lambda x, **cond: c * x.flatten(1).sum(1)      # noqa: E731
    sampler = dk.get_sampler("ddim", SCHED)
    ts, abars = sampler.plan(10)
    x_t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in (0, 4, 8):
        abar, abar_prev = float(abars[i]), float(abars[i + 1])
        plain = sampler.sample(zero_eps, x_t, 10, start_step=i, stop_step=i + 1)
        source = SourceGuidance([Guide(loss, s, "source")], SCHED)
        # the source: after the step, x <- x - s sqrt(abar_t) grad L(x)
        expected = source.apply(plain, float(ts[i]), {})
        torch.testing.assert_close(expected, plain - s * math.sqrt(abar) * c, rtol=0, atol=1e-12)
        s_eps = eps_scale_for_source(s, abar, abar_prev)
        guided = GradientGuidance(Denoiser(zero_eps), loss, s_eps, weighting="constant")
        got = sampler.sample(guided, x_t, 10, start_step=i, stop_step=i + 1)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # the two forms differ at equal nominal scale by a factor that depends on the step size: matching the
    # source takes an eps-form scale that grows as the steps shrink (about 20x from 50 to 1000 steps here)
    def median_scale(n):
        _, ab = dk.get_sampler("ddim", SCHED).plan(n)
        return float(torch.tensor([eps_scale_for_source(1.0, float(a), float(b))
                                   for a, b in zip(ab[1:-2], ab[2:-1])]).median())
    assert median_scale(1000) > 5 * median_scale(50)


def test_guided_denoiser_stacks_every_kind_and_is_a_denoiser():
    den = Denoiser(lambda x, t, class_labels=None: torch.zeros_like(x))
    clf = lambda x, t: torch.stack([x.flatten(1).mean(1), -x.flatten(1).mean(1)], 1)   # noqa: E731
    stacked = guided_denoiser(den, guidance_scale=2.0, guides=[brightness_guide(0.5, 1.0)], classifier=clf,
                              classifier_scale=1.0, target_class=0)
    assert isinstance(stacked, Denoiser)
    assert isinstance(guided_denoiser(den, guidance_scale=3.0), Denoiser)   # CFG around a Denoiser
    x = torch.zeros(2, 1, 4, 4)
    pred = stacked(x, torch.tensor(500.0), 0.5, class_labels=torch.tensor([0, 1]))
    # both the brightness guide (toward +0.5) and the classifier (class 0 = brighter) raise x0
    assert bool((pred.x0 > 0).all())


def _gaussian_pipeline(shape):
    """A Pipeline whose model is the exact denoiser of N(0, 0.5^2 I) images of the given shape."""
    from diffusekit.toy import ExactDenoiserModel, GaussianMixture
    d = math.prod(shape)
    exact = ExactDenoiserModel(GaussianMixture(torch.zeros(1, d), torch.full((1,), 0.5)), SCHED)
    return Pipeline(lambda x, t, **cond: exact(x.flatten(1), t).view_as(x), SCHED, image_shape=shape)


def test_pipeline_brightness_and_colour_guides_move_the_means():
    g = lambda: torch.Generator().manual_seed(0)                                     # noqa: E731
    gray = _gaussian_pipeline((1, 8, 8))
    base = gray.sample(16, "ddim", 20, generator=g()).mean()
    bright = gray.sample(16, "ddim", 20, generator=g(), guides=[brightness_guide(0.8, 20.0)]).mean()
    dark = gray.sample(16, "ddim", 20, generator=g(), guides=[brightness_guide(-0.8, 20.0)]).mean()
    # the prior pins the mean of 64 pixels to N(0, 0.06^2): a visible pull against it
    assert bright - base > 0.05 and base - dark > 0.05
    rgb = _gaussian_pipeline((3, 4, 4))
    target = torch.tensor([0.8, -0.8, 0.0])
    plain = rgb.sample(16, "ddim", 20, generator=g()).mean((0, 2, 3))
    for guide in (color_guide(target.tolist(), 20.0), color_guide(target.tolist(), 1.0, "source")):
        steered = rgb.sample(16, "ddim", 20, generator=g(), guides=[guide]).mean((0, 2, 3))
        assert float((steered - target).norm()) < 0.8 * float((plain - target).norm()), guide.weighting


def test_mean_intensity_loss_is_the_squared_distance():
    x = torch.full((2, 3, 4, 4), 0.25)
    assert torch.allclose(mean_intensity_loss(0.5)(x), torch.full((2,), 0.0625))


# --- runs: metadata checked at load, old configs migrated -------------------------------------------

def test_load_run_detects_edited_prediction_type_and_schedule(tmp_path):
    from diffusekit.data import DataConfig
    from diffusekit.store.run_config import RunConfig, TrainConfig
    from diffusekit.store.run import load_run
    from diffusekit.training import train
    model = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), num_heads=2, groups=4, num_classes=10)
    cfg = RunConfig(model=model, schedule=dk.ScheduleConfig(num_train_timesteps=100), data=DataConfig(),
                    train=TrainConfig(steps=2, batch_size=16, save_every=2, sample_every=0, device="cpu"))
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    good = json.loads((run / "config.json").read_text())
    for section, key, value in (("model", "prediction_type", "v_prediction"), ("schedule", "kind", "cosine")):
        edited = json.loads(json.dumps(good))
        edited[section][key] = value
        (run / "config.json").write_text(json.dumps(edited))
        with pytest.raises(dk.store.CheckpointError, match=f"{section}.{key}: config.json has '{value}'"):
            load_run(run)
    # a config.json of the earlier layout (prediction_type under train, mixed_precision) still loads
    old = json.loads(json.dumps(good))
    old["train"]["prediction_type"] = old["model"].pop("prediction_type")
    old["train"]["mixed_precision"] = "no"
    del old["train"]["precision"]
    (run / "config.json").write_text(json.dumps(old))
    cfg2, _, _ = load_run(run)
    assert cfg2.model.prediction_type == "epsilon" and cfg2.train.precision == "fp32"


# --- the import graph ------------------------------------------------------------------------------

def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            yield node.module, [a.name for a in node.names], node.level
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], 0


def test_only_the_cli_imports_the_trainer_and_no_private_names_cross_modules():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        for module, names, _ in _imports(path):
            last = module.split(".")[-1]
            if last == "train" and rel not in ("cli.py", "train.py"):
                pytest.fail(f"{rel} imports the trainer ({module}); only the CLI may")
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{rel} imports private names {private} from {module}"


def test_train_module_is_short_and_every_function_fits_a_screen():
    assert len((SRC / "train.py").read_text().splitlines()) < 300
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
