"""Every fast path computes what the plain path computes: batched embedding projections, attention
upcast on CPU, torch.compile (with its eager fallback); and the rules that pick precision and compile."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffusekit import device, fastpath
from diffusekit.nn.attention import scaled_dot_product_attention
from diffusekit.nn.unet import UNet, UNetConfig, project_all


def _perturbed_unet(seed: int = 0, **overrides) -> UNet:
    """A tiny UNet whose zero-initialised layers get small random weights, so every path matters."""
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), num_heads=2, groups=4, **overrides)
    torch.manual_seed(seed)  # test-only: parameter init
    model = UNet(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.rand(batch, generator=g) * 999


def _assert_close_to_scale(actual, expected, rel):
    """|actual - expected| <= rel * max|expected|: float rounding of a reordered computation, at the tensor's scale."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * expected.abs().max().item() + 1e-12)


def _out_and_grads(model, x, t, **cond):
    out = model(x, t, **cond)
    params = (model.model if isinstance(model, fastpath.CompiledModel) else model).parameters()
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), list(params))
    return out.detach(), grads


@pytest.mark.parametrize("overrides", [dict(num_classes=3), dict(num_classes=3, use_scale_shift_norm=False),
                                       dict(text_conditioning="multiply", context_dim=6), dict()])
def test_batched_projections_match_per_block(overrides):
    model = _perturbed_unet(**overrides)
    x, t = _inputs()
    cond = {}
    if "num_classes" in overrides:
        cond["class_labels"] = torch.tensor([0, 2, -1])
    if "context_dim" in overrides:
        cond["text_embeds"] = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    model.batch_projections = False
    ref, ref_grads = _out_and_grads(model, x, t, **cond)
    model.batch_projections = True
    out, grads = _out_and_grads(model, x, t, **cond)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_project_all_is_each_blocks_projection():
    model = _perturbed_unet(num_classes=3)
    g = torch.Generator().manual_seed(3)
    temb, cemb = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    together = project_all(model.res_blocks, temb, cemb)
    levels, n = len(model.config.channel_mult), model.config.num_res_blocks
    assert list(together) == model.res_blocks and len(model.res_blocks) == levels * n + 2 + levels * (n + 1)
    for block in model.res_blocks:
        emb, ctx = block.project(temb, cemb)
        torch.testing.assert_close(together[block][0], emb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(together[block][1], ctx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_upcast_matches_math_path_in_bf16(masked):
    g = torch.Generator().manual_seed(4)
    q, k, v = (2 * torch.randn(2, 4, 49, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 49, generator=g) > 0.3 if masked else None
    qb, kb, vb = (a.bfloat16() for a in (q, k, v))
    # the exact attention of the bf16 inputs
    truth = F.scaled_dot_product_attention(qb.double(), kb.double(), vb.double(),
                                           attn_mask=None if mask is None else mask[:, None, None, :])
    fast = scaled_dot_product_attention(qb, kb, vb, mask)
    plain = scaled_dot_product_attention(qb, kb, vb, mask, upcast_on_cpu=False)
    assert fast.dtype == plain.dtype == torch.bfloat16
    # both compute in fp32 from the same bf16 inputs and round once: they differ by at most one bf16 ulp
    torch.testing.assert_close(fast.float(), plain.float(), rtol=2 ** -7, atol=2 ** -7)
    err_fast, err_plain = ((a.double() - truth).abs().mean().item() for a in (fast, plain))
    assert err_fast <= 1.05 * err_plain
    # the check can fail: a plain bf16 softmax-attention (no fp32 inside) is measurably further off
    w = (qb @ kb.transpose(-1, -2) / 4.0)
    if mask is not None:
        w = w.masked_fill(~mask[:, None, None, :], float("-inf"))
    naive = w.softmax(-1) @ vb
    assert (naive.double() - truth).abs().mean().item() > 1.5 * err_fast


def test_attention_upcast_in_a_bf16_unet_matches_plain_path(monkeypatch):
    import diffusekit.nn.attention as attention
    model = _perturbed_unet(num_classes=3).eval()
    x, t = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x, t, class_labels=torch.tensor([0, 1, 2])).float()
        plain_sdpa = attention.scaled_dot_product_attention
        monkeypatch.setattr(attention, "scaled_dot_product_attention",
                            lambda *a, **k: plain_sdpa(*a, **k, upcast_on_cpu=False))
        model.batch_projections = False
        plain = model(x, t, class_labels=torch.tensor([0, 1, 2])).float()
    ref = model.float()(x, t, class_labels=torch.tensor([0, 1, 2])).detach()
    # both are bf16 computations of the fp32 result: each within bf16 error of it, and of each other
    scale = ref.abs().max()
    assert (fast - ref).abs().max() < 0.05 * scale and (plain - ref).abs().max() < 0.05 * scale
    assert (fast - plain).abs().max() < 0.05 * scale


def test_maybe_compile_disabled_returns_the_model():
    model = _perturbed_unet()
    assert fastpath.maybe_compile(model, False) is model


def test_compiled_graph_matches_eager_forward_and_gradients():
    """dynamo + AOT autograd capture the UNet in one graph (fullgraph=True fails on any graph break) and
    compute its outputs and gradients. (Inductor's kernels are checked against eager by the benchmark.)"""
    torch._dynamo.reset()
    model = _perturbed_unet()
    x, t = _inputs()
    ref, ref_grads = _out_and_grads(model, x, t)
    compiled = fastpath.maybe_compile(model, True, backend="aot_eager", fullgraph=True)
    out, grads = _out_and_grads(compiled, x, t)
    assert compiled.error is None
    # the compiled graph takes the plain formulations (nn/ keeps its eager-only fast paths out of
    # inductor's way), so it agrees with eager to fp32 rounding, not bit for bit
    _assert_close_to_scale(out, ref, 1e-5)
    for g, r in zip(grads, ref_grads):
        _assert_close_to_scale(g, r, 1e-4)


def test_compiled_class_conditional_unet_matches_eager():
    """The label range check reads the labels back (one graph break before the network); the result is unchanged."""
    torch._dynamo.reset()
    model = _perturbed_unet(num_classes=3).eval()
    x, t = _inputs()
    labels = torch.tensor([1, -1, 2])
    compiled = fastpath.maybe_compile(model, True, backend="eager")
    with torch.no_grad():
        _assert_close_to_scale(compiled(x, t, class_labels=labels), model(x, t, class_labels=labels), 1e-5)
        with pytest.raises(ValueError, match="class_labels contains 4"):
            compiled(x, t, class_labels=torch.tensor([4, 0, 1]))
    assert compiled.error is None


def test_compile_failure_falls_back_to_eager_with_one_warning():
    torch._dynamo.reset()
    model = _perturbed_unet().eval()
    x, t = _inputs()

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found (simulated)")

    compiled = fastpath.maybe_compile(model, True, backend=broken_backend)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="torch.compile failed.*no C\\+\\+ compiler.*eagerly"):
            first = compiled(x, t)
        with warnings.catch_warnings():
            warnings.simplefilter("error")               # no second warning
            second = compiled(x, t)
        ref = model(x, t)
    assert compiled.error is not None
    assert torch.equal(first, ref) and torch.equal(second, ref)


def test_compiled_model_raises_the_models_own_errors():
    torch._dynamo.reset()
    model = _perturbed_unet()
    compiled = fastpath.maybe_compile(model, True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        compiled(torch.randn(2, 3, 8, 8), torch.zeros(2))
    assert compiled.error is None                        # a user error is not a compile failure


def test_compile_pays_break_even():
    # 100 calls saving 0.1 s each repay 9 s of compiling, not 11 s
    assert fastpath.compile_pays(100, eager_s=0.3, compiled_s=0.2, compile_s=9.0)
    assert not fastpath.compile_pays(100, eager_s=0.3, compiled_s=0.2, compile_s=11.0)
    assert not fastpath.compile_pays(10 ** 6, eager_s=0.2, compiled_s=0.2, compile_s=1.0)   # no gain, never


def test_should_compile_follows_the_measured_table(monkeypatch):
    monkeypatch.setattr(fastpath, "CPU_BREAK_EVEN_CALLS", {"train": None, "sample_batch": 500, "sample_single": 9000})
    monkeypatch.setattr(fastpath, "compile_unsupported_reason", lambda: None)
    assert not fastpath.should_compile("cpu", 10 ** 9, training=True, batch_size=64)       # None: never pays
    assert fastpath.should_compile("cpu", 501, training=False, batch_size=64)
    assert not fastpath.should_compile("cpu", 500, training=False, batch_size=64)
    assert not fastpath.should_compile("cpu", 8000, training=False, batch_size=2)          # CFG at batch 1
    assert fastpath.should_compile("cpu", 9001, training=False, batch_size=1)
    assert not fastpath.should_compile("meta", 10 ** 9, training=False, batch_size=64)     # not measured
    monkeypatch.setattr(fastpath, "compile_unsupported_reason", lambda: "no dynamo here")
    assert not fastpath.should_compile("cpu", 10 ** 9, training=False, batch_size=1)


def test_native_bf16_detection_and_auto_precision(monkeypatch):
    device._cpu_flags.cache_clear()
    monkeypatch.setattr(device, "_cpu_flags", lambda: frozenset({"sse2", "avx512f", "avx512_bf16"}))
    assert device.has_native_bf16("cpu") and device.default_precision("cpu") == "bf16"
    assert device.resolve_precision("auto", "cpu") == "bf16" and device.resolve_precision("fp32", "cpu") == "fp32"
    with device.autocast("cpu", "auto"):                                    # "auto" autocasts to bf16 here
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(device, "_cpu_flags", lambda: frozenset({"sse2", "avx2", "amx_bf16"}))
    assert device.default_precision("cpu") == "bf16"
    monkeypatch.setattr(device, "_cpu_flags", lambda: frozenset({"sse2", "avx512f"}))
    assert not device.has_native_bf16("cpu") and device.default_precision("cpu") == "fp32"
    assert device.resolve_precision("auto", "cpu") == "fp32"
    with device.autocast("cpu", "auto"):                                    # and runs fp32 where bf16 is emulated
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert device.default_precision("meta") == "fp32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_modulated_group_norm_is_norm_times_scale_plus_shift(dtype, affine):
    from diffusekit.nn.layers import GroupNorm
    g = torch.Generator().manual_seed(5)
    norm = GroupNorm(4, 8, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.5, generator=g)
            norm.bias.normal_(0.0, 0.5, generator=g)
    x = (3 * torch.randn(3, 8, 5, 5, generator=g) + 1).to(dtype)
    scale, shift = (torch.randn(3, 8, 1, 1, generator=g).to(dtype) for _ in range(2))
    # the plain path, in fp64: norm(x) * scale + shift
    ref = norm.double()(x.double()) * scale.double() + shift.double()
    norm.float()
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out = norm.modulated(inp, scale, shift)
        assert out.shape == x.shape and out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
    # gradients reach x, scale, shift and the affine parameters as in the plain path
    xs, ss, hs = (a.double().requires_grad_() for a in (x, scale, shift))
    norm.double()
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    params = [xs, ss, hs] + list(norm.parameters())
    fast = torch.autograd.grad((norm.modulated(xs, ss, hs) * w).sum(), params)
    plain = torch.autograd.grad(((norm(xs) * ss + hs) * w).sum(), params)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_training_compiles_on_request_and_trains_what_eager_trains(tmp_path, monkeypatch):
    # train.compile="on" routes the training forward through fastpath.maybe_compile (here with the
    # aot_eager backend: torch.compile's graph capture and autograd without the C++ compiler) and
    # trains the weights eager training trains; "auto" follows the measured table (never, for CPU
    # training); "off" never compiles
    from test_multinode import assert_same_training, tiny_distributed_run
    from diffusekit.training import diffusion as train_module
    calls = []

    def recording_compile(model, enabled=True, **kw):
        calls.append(enabled)
        return fastpath.maybe_compile(model, enabled, backend="aot_eager")
    monkeypatch.setattr(train_module, "maybe_compile", recording_compile)
    runs = {}
    for choice in ("off", "on", "auto"):
        runs[choice] = tiny_distributed_run(steps=4, batch_size=16, precision="fp32", compile=choice)
        train_module.train(runs[choice], tmp_path / choice, progress=False)
    assert calls == [False, True, fastpath.should_compile("cpu", 4, training=True, batch_size=16)]
    assert_same_training(tmp_path / "off", tmp_path / "on", runs["off"])
    with pytest.raises(ValueError, match="compile='sometimes'"):
        fastpath.compile_wanted("sometimes", "cpu", 10, training=True, batch_size=1)


def test_pipeline_compile_samples_what_eager_samples(monkeypatch):
    # Pipeline.compile("on") routes the sampler's model calls through the compiled network (aot_eager
    # here); "off" and "auto" for a short CPU run (below the measured break-even) leave it eager
    from diffusekit.pipeline import Pipeline
    from diffusekit.schedule import NoiseSchedule
    real = fastpath.maybe_compile
    monkeypatch.setattr(fastpath, "maybe_compile", lambda model, enabled=True, **kw: real(model, enabled, backend="aot_eager"))
    torch._dynamo.reset()
    pipe = Pipeline(_perturbed_unet(), NoiseSchedule.create("linear", num_train_timesteps=100),
                    image_shape=(1, 8, 8), device="cpu", precision="fp32")
    eager = pipe.sample(3, "ddim", 4, generator=torch.Generator().manual_seed(0))
    assert not pipe.compile("auto", calls=4, batch_size=3) and pipe.compiled is None
    assert pipe.compile("on") and isinstance(pipe.compiled, fastpath.CompiledModel)
    compiled = pipe.sample(3, "ddim", 4, generator=torch.Generator().manual_seed(0))
    assert pipe.compiled.error is None
    _assert_close_to_scale(compiled, eager, 1e-4)
    assert not pipe.compile("off") and pipe.compiled is None
