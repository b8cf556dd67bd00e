"""device.module_device and the Pipeline's default device: a Pipeline built from a model runs where the model is."""
import torch

from diffusekit.device import module_device
from diffusekit.pipeline import Pipeline
from diffusekit.schedule import NoiseSchedule


def test_module_device_is_where_the_weights_are():
    assert module_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(lambda x, t: x) == torch.device("cpu")          # a plain callable
    assert module_device(torch.nn.Identity()) == torch.device("cpu")      # no tensors


def test_a_pipeline_defaults_to_its_models_device():
    schedule = NoiseSchedule.create("linear", num_train_timesteps=10)
    on_meta = Pipeline(torch.nn.Conv2d(1, 1, 1, device="meta"), schedule, image_shape=(1, 4, 4))
    assert on_meta.device == torch.device("meta")
    assert Pipeline(torch.nn.Conv2d(1, 1, 1), schedule, image_shape=(1, 4, 4)).device == torch.device("cpu")
