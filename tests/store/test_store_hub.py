"""A Hugging Face Hub repo id already in the local HF cache loads like its folder (offline), and a missing
one gets a one-line error saying how to download it."""
import shutil

import pytest
from click.testing import CliRunner

from diffusekit.cli import main
from diffusekit.store.hub import resolve_folder

hub = pytest.importorskip("huggingface_hub", reason="Hub repo ids need huggingface_hub (installed with diffusers)")

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hub") / "tiny"
    r = CliRunner().invoke(main, ["train", "--out", str(run), "--data", "digits", "--batch-size", "16",
                                  "--sample-every", "0", "--train-steps", "2", "--preset", "tiny8", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def hf_cache(tmp_path, tiny_run, monkeypatch):
    """HF_HUB_CACHE/models--me--tiny-digits/{refs/main, snapshots/REV/<the run>} as huggingface_hub lays it out."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--me--tiny-digits"
    shutil.copytree(tiny_run, repo / "snapshots" / REV, ignore=shutil.ignore_patterns(".lock"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))      # read at import; the env is for children
    return cache


def test_resolve_folder_paths_cached_repo_ids_and_errors(hf_cache, tiny_run, tmp_path):
    assert resolve_folder(tiny_run) == tiny_run                                   # a folder as it is
    assert resolve_folder("me/tiny-digits") == hf_cache / "models--me--tiny-digits" / "snapshots" / REV
    with pytest.raises(FileNotFoundError, match="hf download me/not-cached"):
        resolve_folder("me/not-cached")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_folder(tmp_path / "no" / "such" / "folder")


def test_cli_samples_a_cached_repo_id_as_its_folder(hf_cache, tiny_run, tmp_path):
    runner = CliRunner()
    common = ["--n", "2", "--steps", "2", "--seed", "3", "--device", "cpu"]
    by_path = runner.invoke(main, ["sample", str(tiny_run), *common, "--out", str(tmp_path / "a.png")])
    by_id = runner.invoke(main, ["sample", "me/tiny-digits", *common, "--out", str(tmp_path / "b.png")])
    assert by_path.exit_code == 0 and by_id.exit_code == 0, by_id.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    missing = runner.invoke(main, ["sample", "me/not-cached", *common, "--out", str(tmp_path / "c.png")])
    assert missing.exit_code == 2 and "hf download me/not-cached" in missing.output
    assert not (tmp_path / "c.png").exists()


def test_cached_repo_id_resolves_at_parse_time_and_the_cache_is_not_written(hf_cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["tune-steps", "me/tiny-digits", "--dry-run", "--out", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    assert '"run": "' + str(hf_cache / "models--me--tiny-digits" / "snapshots" / REV) + '"' in r.output
    r = runner.invoke(main, ["tune-steps", "me/tiny-digits", "--dry-run"])
    assert r.exit_code == 2 and "--out" in r.output


def test_cli_samples_a_cached_diffusers_folder_by_repo_id(tmp_path, monkeypatch):
    pytest.importorskip("diffusers", reason="a diffusers folder needs diffusers")
    runner = CliRunner()
    run, exported = tmp_path / "uncond", tmp_path / "exported"
    r = runner.invoke(main, ["train", "--out", str(run), "--data", "digits", "--unconditional", "--batch-size", "16",
                             "--sample-every", "0", "--train-steps", "2", "--preset", "tiny8", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", str(run), str(exported)])
    assert r.exit_code == 0 and "diffusers loads" in r.output, r.output
    cache = tmp_path / "hf-cache"
    shutil.copytree(exported, cache / "models--me--tiny-ddpm" / "snapshots" / REV)
    (cache / "models--me--tiny-ddpm" / "refs").mkdir()
    (cache / "models--me--tiny-ddpm" / "refs" / "main").write_text(REV)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    common = ["--n", "2", "--steps", "2", "--seed", "1", "--device", "cpu"]
    by_path = runner.invoke(main, ["sample", str(exported), *common, "--out", str(tmp_path / "a.png")])
    by_id = runner.invoke(main, ["sample", "me/tiny-ddpm", *common, "--out", str(tmp_path / "b.png")])
    assert by_path.exit_code == 0 and by_id.exit_code == 0, by_id.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_pipeline_load_and_open_take_a_cached_repo_id(hf_cache, tiny_run):
    """Pipeline.load / Pipeline.open resolve owner/name through the local HF cache, as the CLI does."""
    import torch
    import diffusekit as dk
    repo_id, folder = "me/tiny-digits", tiny_run
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    by_path = dk.Pipeline.load(folder, device="cpu").sample(2, num_steps=3, generator=g())
    assert torch.equal(dk.Pipeline.load(repo_id, device="cpu").sample(2, num_steps=3, generator=g()), by_path)
    assert torch.equal(dk.Pipeline.open(repo_id, device="cpu").sample(2, num_steps=3, generator=g()), by_path)
