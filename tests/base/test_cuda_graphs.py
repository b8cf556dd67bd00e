"""CUDA graphs for fixed-shape sampling (fastpath.GraphedModel) compute what the eager network computes.

A CUDA graph records kernels once and replays them on the same memory: the inputs must be copied into
the captured (static) tensors before each replay, and each replay overwrites the captured output. On
the CPU the `Replayer` below has exactly these semantics (it reruns the captured function on the static
inputs and writes into the static output), so the bookkeeping (signatures, copies in and out, the
first-replay check, the eager fallbacks) is tested everywhere; the real capture runs where a GPU is.
"""
import threading
import warnings

import pytest
import torch

from diffusekit import ConfigError
from diffusekit.fastpath import CudaGraphCapture, GraphedModel, cuda_graphs_wanted
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.pipeline import Pipeline
from diffusekit.schedule import NoiseSchedule

SCHED = NoiseSchedule.create("linear", num_train_timesteps=100)


class Replayer:
    """A CUDA graph's semantics on any device: static inputs read at replay, one output tensor overwritten."""

    def __init__(self, fail: bool = False):
        self.captures = self.replays = 0
        self.fail = fail

    def __call__(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        out = fn()

        def replay():
            self.replays += 1
            out.copy_(fn())
        return replay, out


def _unet(num_classes: int = 0, **overrides) -> UNet:
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), num_heads=2, groups=4, num_classes=num_classes, **overrides)
    torch.manual_seed(0)  # test-only: parameter init
    model = UNet(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                         # the zero-initialised output layers get weights too
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _pipe(model) -> Pipeline:
    return Pipeline(model, SCHED, image_shape=(1, 8, 8), num_classes=model.config.num_classes, device="cpu")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm", "unipc"])
def test_graphed_sampling_equals_eager_and_replays_one_graph_per_shape(sampler):
    # multistep solvers keep earlier model outputs: a replay that handed out the static output itself
    # would overwrite them, and one that skipped copying the inputs would denoise the first step forever
    pipe = _pipe(_unet(num_classes=3))
    eager = pipe.sample(5, sampler, 6, generator=torch.Generator().manual_seed(1), class_labels=[0, 1, 2, 0, 1],
                        guidance_scale=2.0, batch_size=3)
    replayer = Replayer()
    pipe.graphed = GraphedModel(pipe._network_call(), capture=replayer)
    graphed = pipe.sample(5, sampler, 6, generator=torch.Generator().manual_seed(1), class_labels=[0, 1, 2, 0, 1],
                          guidance_scale=2.0, batch_size=3)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    calls = pipe.sampler_for(sampler).nfe(6)
    # two batch shapes (3 and the last 2, each doubled by guidance): two graphs, every call but each
    # graph's first (run eagerly and checked against one replay) served by a replay
    assert replayer.captures == 2 and len(pipe.graphed.graphs) == 2 and not pipe.graphed.eager
    assert replayer.replays == 2 * calls
    again = pipe.sample(5, sampler, 6, generator=torch.Generator().manual_seed(1), class_labels=[0, 1, 2, 0, 1],
                        guidance_scale=2.0, batch_size=3)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    assert replayer.captures == 2 and replayer.replays == 4 * calls


def test_outputs_kept_across_calls_are_not_overwritten():
    net = lambda x, t: x * t.view(-1, 1)      # noqa: E731
    graphed = GraphedModel(net, capture=Replayer())
    with torch.no_grad():
        x = torch.ones(2, 3)
        first = graphed(x, torch.tensor([1.0, 2.0]))
        second = graphed(x, torch.tensor([3.0, 4.0]))
        third = graphed(2 * x, torch.tensor([3.0, 4.0]))
    assert torch.equal(first, net(x, torch.tensor([1.0, 2.0])))
    assert torch.equal(second, net(x, torch.tensor([3.0, 4.0])))
    assert torch.equal(third, net(2 * x, torch.tensor([3.0, 4.0])))


def test_autograd_and_unhashable_inputs_run_eagerly():
    model = _unet()
    replayer = Replayer()
    graphed = GraphedModel(model, capture=replayer)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    t = torch.tensor([10.0, 50.0])
    out = graphed(x, t)                             # grad enabled: gradient guidance differentiates here
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(model(x, t).sum(), x)
    torch.testing.assert_close(grad, expected)
    assert replayer.captures == 0 and not graphed.graphs
    listed = GraphedModel(lambda x, t, scales: x * scales[0], capture=replayer)
    with torch.no_grad():       # a list: not a value a graph can be keyed on
        assert torch.equal(listed(torch.ones(2), t, scales=[3.0]), torch.full((2,), 3.0))
    assert replayer.captures == 0 and not listed.graphs


def test_capture_failure_warns_once_and_stays_eager():
    model = _unet()
    graphed = GraphedModel(model, capture=Replayer(fail=True))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 50.0])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [graphed(x, t) for _ in range(3)]
        expected = model(x, t)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "capturing failed (RuntimeError: operation not permitted" in messages[0]
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_model_with_python_side_state_is_caught_by_the_first_replay():
    # a graph replays the kernels of its capture: a model whose result depends on Python state that
    # changes between calls would be silently wrong, so the first replay is compared with eager
    class Counting:
        calls = 0

        def __call__(self, x, t):
            self.calls += 1
            return x * self.calls
    graphed = GraphedModel(Counting(), capture=Replayer())
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="replay differed from the eager model"):
        out = graphed(torch.ones(2), torch.zeros(2))
    assert not graphed.graphs and len(graphed.eager) == 1
    assert torch.equal(out, torch.full((2,), 2.0))  # the eager call's result (capture 1, eager 2, replay 3)


def test_more_shapes_than_max_graphs_run_eagerly():
    graphed = GraphedModel(lambda x, t: x + t, capture=Replayer(), max_graphs=2)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="more than 2 input shapes"):
        outs = [graphed(torch.ones(n), torch.ones(n)) for n in (1, 2, 3, 4)]
    assert len(graphed.graphs) == 2 and len(graphed.eager) == 2
    assert all(torch.equal(o, torch.full((n,), 2.0)) for o, n in zip(outs, (1, 2, 3, 4)))


def test_concurrent_callers_each_get_their_own_result():
    # a web page's requests sample in parallel threads; they share one graph's static buffers
    graphed = GraphedModel(lambda x, t: x * 2 + t, capture=Replayer())
    results, errors = {}, []

    def worker(k):
        try:
            with torch.no_grad():
                for i in range(200):
                    x = torch.full((4,), float(k * 1000 + i))
                    out = graphed(x, torch.zeros(4))
                    if not torch.equal(out, 2 * x):
                        errors.append((k, i))
            results[k] = True
        except Exception as error:          # noqa: BLE001
            errors.append(error)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 4


def test_cuda_graphs_choice_and_pipeline_switch():
    assert not cuda_graphs_wanted("auto", "cpu") and not cuda_graphs_wanted("off", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device; this model runs on cpu"):
        cuda_graphs_wanted("on", "cpu")
    with pytest.raises(ValueError, match="cuda_graphs='sometimes'"):
        cuda_graphs_wanted("sometimes", "cpu")
    pipe = _pipe(_unet())
    assert not pipe.use_cuda_graphs("auto") and pipe.graphed is None
    with pytest.raises(ConfigError, match="--device cuda"):
        pipe.use_cuda_graphs("on")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_cuda_graphs_sample_what_eager_samples(precision):
    model = _unet(num_classes=3).cuda()
    pipe = Pipeline(model, SCHED, image_shape=(1, 8, 8), num_classes=3, device="cuda", precision=precision)
    kw = dict(generator=torch.Generator().manual_seed(1), class_labels=[0, 1, 2, 0, 1], guidance_scale=2.0,
              batch_size=3)
    eager = pipe.sample(5, "dpmpp_2m", 8, **kw)
    assert pipe.use_cuda_graphs("on") and isinstance(pipe.graphed.capture, CudaGraphCapture)
    kw["generator"] = torch.Generator().manual_seed(1)
    graphed = pipe.sample(5, "dpmpp_2m", 8, **kw)
    assert len(pipe.graphed.graphs) == 2 and not pipe.graphed.eager
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_real_cuda_graphs_capture_class_and_text_conditioned_unets():
    # the input checks that read values on the host (label range, all-masked rows) must not break capture
    model = _unet(num_classes=3, text_conditioning="cross_attention", context_dim=6).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8, device="cuda", generator=g), torch.tensor([5.0, 50.0, 500.0, 900.0], device="cuda")
    cond = dict(class_labels=torch.tensor([0, 1, 2, -1], device="cuda"),
                encoder_hidden_states=torch.randn(4, 5, 6, device="cuda", generator=g),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0]] * 4, device="cuda"))
    graphed = GraphedModel(model)
    with torch.no_grad():
        for scale in (1.0, -0.5, 2.0):
            torch.testing.assert_close(graphed(scale * x, t, **cond), model(scale * x, t, **cond), rtol=1e-5, atol=1e-5)
    assert len(graphed.graphs) == 1 and not graphed.eager, graphed.eager
