"""Which sampler inpaint runs: the one named, else a diffusers folder's own scheduler, else ddim for a run."""
import pytest
import torch

from diffusekit.pipeline import Pipeline
from diffusekit.schedule import NoiseSchedule
from diffusekit.training.skeleton import Trainer


def _pipe(scheduler_config=None):
    schedule = NoiseSchedule.create("linear", num_train_timesteps=10)
    return Pipeline(torch.nn.Conv2d(1, 1, 1), schedule, image_shape=(1, 4, 4), scheduler_config=scheduler_config)


def test_inpaint_sampler_default_follows_the_model_kind():
    assert _pipe().inpaint_sampler() == "ddim"
    assert _pipe().inpaint_sampler("unipc") == "unipc"
    folder = _pipe({"_class_name": "DDIMScheduler"})
    assert folder.inpaint_sampler() is None and folder.inpaint_sampler("euler") == "euler"


def test_a_trainer_must_supply_its_model_config_and_step():
    class Partial(Trainer):
        def read_config(self, folder):
            return None

    with pytest.raises(TypeError, match="make_model"):
        Partial()
