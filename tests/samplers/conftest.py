"""Fixtures every sampler test file shares: the linear schedule, the reference Gaussian mixture, diffusers."""
import pytest

import diffusekit as dk
from diffusekit.toy import GaussianMixture


@pytest.fixture(scope="module")
def sched():
    return dk.NoiseSchedule.create("linear")


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], [0.25, 0.4, 0.3], [0.3, 0.5, 0.2])


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")
