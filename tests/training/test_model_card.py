"""A run's README.md is a Hub model card: front matter read back by huggingface_hub, relative load snippet."""
import sys
from dataclasses import replace

import pytest

from diffusekit.store.run_config import LatentConfig
from diffusekit.store.hub import hub_repo_id
from diffusekit.training.model_card import write_model_card
from diffusekit.training.resolve import resolve_run_config

hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub reads the card (installed with diffusers)")

TINY = {"data.source": "digits", "model.base_channels": 8, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
        "model.groups": 4, "model.attention_resolutions": (), "model.num_heads": 2, "train.device": "cpu"}


@pytest.fixture(scope="module")
def digits_cfg():
    return resolve_run_config(dict(TINY))[0]


def _card(run):
    return hub.ModelCard.load(run / "README.md")


def test_card_front_matter_is_read_by_the_hub_library_and_holds_no_absolute_path(tmp_path, digits_cfg):
    run = tmp_path / "digits-run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step_000040.png").write_bytes(b"")
    write_model_card(run, digits_cfg, 40)
    data = _card(run).data
    assert data.library_name == "diffusekit" and data.license == "cc-by-4.0"          # digits: UCI, CC BY 4.0
    assert "class-conditional" in data.tags and "diffusekit" in data.tags
    assert data.base_model is None and data.datasets is None                        # trained from scratch
    text = (run / "README.md").read_text()
    assert str(tmp_path) not in text and "/" + tmp_path.parts[1] not in text        # no path of this machine
    assert 'dk.Pipeline.load("digits-run")' in text and "](samples/step_000040.png)" in text


def test_card_names_hub_pieces_and_falls_back_without_the_hub_library(tmp_path, digits_cfg, monkeypatch):
    cache = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-mse" / "snapshots" / "abc123"
    data_dir = tmp_path / "hub" / "datasets--ylecun--mnist" / "snapshots" / "def456"
    cfg = replace(digits_cfg, latent=LatentConfig(autoencoder=str(cache), image_size=64),
                  data=replace(digits_cfg.data, source=str(data_dir)))
    for name in "ab":
        (tmp_path / name).mkdir()
    write_model_card(tmp_path / "a", cfg, 1, base_model=["owner/parent"])
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)                       # import fails: JSON-style YAML
    write_model_card(tmp_path / "b", cfg, 1, base_model=["owner/parent"])
    monkeypatch.undo()
    a, b = _card(tmp_path / "a").data, _card(tmp_path / "b").data
    assert a.to_dict() == b.to_dict()
    assert a.base_model == ["owner/parent", "stabilityai/sd-vae-ft-mse"] and a.datasets == ["ylecun/mnist"]
    assert a.license == "other" and "latent-diffusion" in a.tags
    assert "set `license:`" in (tmp_path / "a" / "README.md").read_text()


def test_hub_repo_id_only_for_ids_and_cache_paths(tmp_path):
    assert hub_repo_id("owner/name") == "owner/name"
    assert hub_repo_id(str(tmp_path)) is None and hub_repo_id("digits") is None
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_repo_id(str(tmp_path / "owner" / "name")) is None                   # an existing folder is local
    assert hub_repo_id(str(tmp_path / "datasets--o--d" / "snapshots" / "r"), "datasets") == "o/d"
    assert hub_repo_id(str(tmp_path / "datasets--o--d" / "snapshots" / "r"), "models") is None
