"""Damaged diffusers folders: each problem gets its own message naming the file, the problem and the fix.

A weights file missing a key (which diffusers leaves on the meta device: "Cannot copy out of meta
tensor"), a weight of the wrong shape (diffusers suggests low_cpu_mem_usage=False), a truncated
safetensors file and a pickle .bin that holds more than tensors (diffusers: "Unable to load weights")
and a pipeline folder without model_index.json. Tiny random models; nothing is downloaded.
"""
import pickle
import shutil

import pytest
import torch

import diffusekit as dk
from diffusekit.config import ConfigError
from diffusekit.interop import export_diffusers, is_diffusers_folder
from diffusekit.nn.unet import UNet, UNetConfig

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def diffusers():
    d = pytest.importorskip("diffusers")
    d.utils.logging.set_verbosity_error()
    return d


@pytest.fixture(scope="module")
def folder(diffusers, tmp_path_factory):
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
    path = tmp_path_factory.mktemp("ddpm") / "pipe"
    diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


@pytest.fixture
def copy(folder, tmp_path):
    target = tmp_path / "pipe"
    shutil.copytree(folder, target)
    return target


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / WEIGHTS))


def _save(path, state_dict):
    from safetensors.torch import save_file
    save_file(state_dict, str(path / WEIGHTS))


def test_the_intact_folder_loads(folder):
    # the control: the same folder, undamaged, loads and samples
    pipe = dk.Pipeline.from_diffusers(folder, device="cpu")
    assert pipe.sample(1, sampler="ddim", num_steps=2, generator=torch.Generator().manual_seed(0)).shape == (1, 1, 8, 8)


def test_missing_key_names_the_keys_the_file_and_the_config(copy):
    state = _weights(copy)
    state.pop("conv_in.bias")
    state.pop("conv_out.weight")
    _save(copy, state)
    with pytest.raises(ConfigError) as err:
        dk.Pipeline.from_diffusers(copy, device="cpu")
    message = str(err.value)
    assert str(copy / WEIGHTS) in message and "lacks 2 of the" in message
    assert "conv_in.bias" in message and "conv_out.weight" in message
    assert "UNet2DModel that unet/config.json builds" in message and "save_pretrained" in message
    assert "meta tensor" not in message


def test_wrong_shape_names_the_weight_both_shapes_and_no_keyword_a_cli_user_cannot_pass(copy):
    state = _weights(copy)
    state["conv_in.weight"] = torch.zeros(8, 1, 5, 5)
    _save(copy, state)
    with pytest.raises(ConfigError) as err:
        dk.Pipeline.from_diffusers(copy, device="cpu")
    message = str(err.value)
    assert "conv_in.weight has shape [8, 1, 5, 5]" in message and "needs [8, 1, 3, 3]" in message
    assert "config.json saved with these weights" in message and "low_cpu_mem_usage" not in message


def test_truncated_safetensors_says_it_was_cut_short(copy):
    data = (copy / WEIGHTS).read_bytes()
    (copy / WEIGHTS).write_bytes(data[:len(data) // 2])
    with pytest.raises(ConfigError) as err:
        dk.Pipeline.from_diffusers(copy, device="cpu")
    message = str(err.value)
    assert f"{copy / WEIGHTS} is not a complete safetensors file" in message
    assert f"{len(data) // 2} bytes" in message and "copy the folder again" in message


def test_pickle_bin_with_objects_is_refused_with_the_conversion(copy):
    (copy / WEIGHTS).unlink()
    bin_file = copy / "unet" / "diffusion_pytorch_model.bin"
    # a pickle that would run code when unpickled (os.system): weights_only=True must stop it
    bin_file.write_bytes(pickle.dumps({"conv_in.weight": _Evil()}))
    with pytest.raises(ConfigError) as err:
        dk.Pipeline.from_diffusers(copy, device="cpu")
    message = str(err.value)
    assert f"{bin_file} is a pickle file that holds more than tensors" in message
    assert "never unpickles" in message and "save_file" in message and "diffusion_pytorch_model.safetensors" in message
    assert not (copy / "pwned").exists()


class _Evil:
    def __reduce__(self):
        import os
        return os.system, ("touch pwned",)


def test_tensor_only_bin_loads_with_weights_only(copy):
    # a .bin of plain tensors is what old diffusers versions wrote: weights_only=True reads it safely
    state = _weights(copy)
    (copy / WEIGHTS).unlink()
    torch.save(state, copy / "unet" / "diffusion_pytorch_model.bin")
    loaded = dk.Pipeline.from_diffusers(copy, device="cpu").model.unet.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_pipeline_folder_without_model_index_is_told_about_model_index(copy):
    (copy / "model_index.json").unlink()
    assert is_diffusers_folder(copy)   # the CLI takes it as a diffusers folder, not as a run
    with pytest.raises(ConfigError) as err:
        dk.Pipeline.from_diffusers(copy, device="cpu")
    message = str(err.value)
    assert "has no model_index.json" in message and "unet/ and scheduler/" in message
    assert '"_class_name": "DDPMPipeline"' in message and "model.safetensors" not in message


def test_exported_diffusekit_unet_missing_a_key_names_it(tmp_path):
    from safetensors.torch import load_file, save_file
    unet = UNet(UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), num_heads=1, groups=4, num_classes=2))
    pipe = dk.Pipeline(unet, dk.NoiseSchedule.create("linear"), image_shape=(1, 8, 8), num_classes=2, device="cpu")
    export_diffusers(pipe, tmp_path / "out")
    file = tmp_path / "out" / "diffusekit_unet" / "model.safetensors"
    state = load_file(str(file))
    dropped = sorted(state)[0]
    state.pop(dropped)
    save_file(state, str(file))
    with pytest.raises(ConfigError) as err:
        dk.Pipeline.from_diffusers(tmp_path / "out", device="cpu")
    message = str(err.value)
    assert f"{file} does not fit the model built from" in message and f"missing: {dropped}" in message
    assert "diffusekit_unet/config.json" in message
