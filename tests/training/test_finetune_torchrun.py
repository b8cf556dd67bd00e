"""`diffusekit finetune` under torchrun: two gloo processes at global batch B train what one process trains at B.

The fine-tune's step draws its instance and class indices, timesteps and noise for the global batch from
(seed, step), and each rank takes its rows (training/finetune_data.py); LoRA dropout draws its masks by global
row. So a two-process run differs from one process only in the order float32 sums are taken (DDP's
all-reduce of the adapter's gradients, the loss mean): `assert_same_run` states the tolerances.

One torchrun launch (2 processes, gloo on the CPU) runs, with one process group:
  * a DreamBooth LoRA fine-tune (prior preservation, LoRA on the UNet's attention and the text encoder,
    LoRA dropout, sample grids, TensorBoard) and a full fine-tune, each rank given its own --out, as two
    machines without a shared file system see it: rank 0's folder holds the run, rank 1's is never made,
    and the class images are drawn once (by rank 0) and reach rank 1 without the file system;
  * a LoRA fine-tune whose rank 0 is SIGKILLed inside its third optimiser step (the last save: step 2), which
    takes the job down, in one folder both ranks see.
A second launch resumes the killed run as a user would: `torchrun --nproc_per_node 2 -m diffusekit finetune
BASE --data DATA --out RUN --resume`. Each run is compared with the same fine-tune run by one process in this
one (the killed one with an uninterrupted one).
"""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft", reason="LoRA adapters need peft (pip install -e '.[finetune]' from a clone)")

from diffusekit import store as ckpt  # noqa: E402
from diffusekit.config import ConfigError  # noqa: E402
from diffusekit.pipeline import Pipeline  # noqa: E402
from diffusekit.training import finetune_data  # noqa: E402
from diffusekit.training.finetune import finetune, finetune_config  # noqa: E402
from diffusekit.training.finetune_data import FinetuneInputs  # noqa: E402
from diffusekit.training.processes import Dist  # noqa: E402
from test_finetune import FAST, TINY, _images, _save_base  # noqa: E402
from test_multinode import LAUNCH_TIMEOUT_S, loopback_env, metrics  # noqa: E402
from diffusekit.nn.text import TextEncoderConfig, build_vocab  # noqa: E402
from diffusekit.nn.unet import UNetConfig  # noqa: E402
from diffusekit.store.run_config import RunConfig  # noqa: E402

STEPS, BATCH = 4, 4
COMMON = {**FAST, "train.steps": STEPS, "train.batch_size": BATCH, "train.log_every": 1}
DREAMBOOTH = {"instance_prompt": "a sks emoji", "class_prompt": "an emoji", "num_class_images": 6,
              "prior_loss_weight": 0.5, "adapter.targets": ["attention", "text"], "adapter.dropout": 0.2,
              "train.sample_every": 2, "train.report_to": "tensorboard"}

# Under torchrun, in every process: the fine-tunes (one process group for all), the last one killed on rank 0.
WORKER = """
import json, os, signal, sys
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook
dist.init_process_group("gloo")
rank = dist.get_rank()
from diffusekit.training import finetune_data
from diffusekit.training.finetune import finetune, finetune_config
plan = json.loads(open(sys.argv[1]).read())

def counting(cfg, pipe):                  # how often, and on which rank, class images are drawn
    with open(plan["calls"].format(rank=rank), "a") as f:
        f.write("drawn\\n")
    # channels-last, as a latent base's decoder returns them: rank 1 must still receive them in their order
    return finetune_data.draw_class_images(cfg, pipe).to(memory_format=torch.channels_last)

for job in plan["library"]:
    cfg = finetune_config(job["base"], job["data"], job["options"])
    finetune(cfg, job["out"].format(rank=rank), progress=False, generate=counting)
steps = [0]

def kill(opt, args, kwargs):              # rank 0 dies after its weights changed, before step 3 is saved
    steps[0] += 1
    if steps[0] == plan["kill_at"] and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(kill)
job = plan["killed"]
finetune(finetune_config(job["base"], job["data"], job["options"]), job["out"], progress=False)
"""


@pytest.fixture()
def bases(tmp_path):
    vocab = build_vocab(["a sks emoji", "an emoji", "a circle"])
    text = TextEncoderConfig(kind="learned", dim=8, layers=1, heads=2, max_length=8, vocab=tuple(vocab))
    # RGB: the channels-last class images below differ from contiguous ones in memory (one channel would not)
    text_cfg = RunConfig(model=UNetConfig(**{**TINY, "in_channels": 3}, text_conditioning="both", context_dim=8),
                         text=text)
    return (_save_base(tmp_path / "base", RunConfig(model=UNetConfig(**TINY))),
            _save_base(tmp_path / "text-base", text_cfg), _images(tmp_path / "data"))


def assert_same_run(one, two, cfg) -> None:
    """Two fine-tunes of cfg trained the same adapter (or weights), EMA, losses and gradient norms.

    Tolerances, as in test_multinode.assert_same_training: a wrong row, seed or scale changes each AdamW update by
    O(lr) per weight, so the weights by up to lr * steps = 4e-2 here; reordering float32 sums changes gradients by
    ~1e-7 relative, which Adam's m / sqrt(v) magnifies where a gradient is near zero. Weights: atol
    1e-2 * lr * steps = 4e-4 (measured: the LoRA runs 5.3e-7; the full fine-tune 8.4e-5 on 1 weight in 500
    and below 7e-6 on the rest, as its random base leaves some gradients near zero). Losses and pre-clip
    gradient norms, sums of ~1e3 float32 terms: rtol 1e-4 (measured: losses 2.3e-7, gradient norms 5.2e-7).
    """
    atol = 1e-2 * cfg.train.lr * cfg.train.steps
    for name in (ckpt.RAW_FILE, ckpt.EMA_FILE):
        a, b = (ckpt.read_weights(run / name)[0] for run in (one, two))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=lambda m: f"{name} {key}: {m}")
    ma, mb = metrics(one), metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, cfg.train.steps + 1))
    for ra, rb in zip(ma, mb):
        for key in ("loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), (key, ra["step"], ra[key], rb[key])


@pytest.mark.slow
def test_two_processes_fine_tune_what_one_process_fine_tunes_and_rank_1_writes_nothing(bases, tmp_path):
    base, text_base, data = bases
    jobs = {"db": (text_base, {**COMMON, **DREAMBOOTH}), "full": (base, {**COMMON, "method": "full"})}
    own = str(tmp_path / "rank{rank}")                     # each rank's own --out: no shared file system
    killed = tmp_path / "two" / "killed"
    plan = {"library": [{"base": str(b), "data": str(data), "options": o, "out": f"{own}/{name}"}
                        for name, (b, o) in jobs.items()],
            "calls": str(tmp_path / "calls{rank}.txt"), "kill_at": 3,
            "killed": {"base": str(base), "data": str(data), "options": {**COMMON, "train.save_every": 2},
                       "out": str(killed)}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(tmp_path / "worker.py"), str(tmp_path / "plan.json")], capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S, env=loopback_env(tmp_path))
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ckpt.read_trainer_state(killed)["step"] == 2, proc.stderr[-3000:]
    before = metrics(killed)[:2]
    proc = subprocess.run([*torchrun, "-m", "diffusekit", "finetune", str(base), "--data", str(data), "--out",
                           str(killed), "--resume"], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env=loopback_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("fine-tuned (lora) 4 steps") == 1, proc.stdout      # rank 0 reports, rank 1 does not

    # one process, the same fine-tunes
    drawn = []

    def counting(cfg, pipe):
        drawn.append(1)
        return finetune_data.draw_class_images(cfg, pipe)
    for name, (b, options) in jobs.items():
        finetune(finetune_config(b, data, options), tmp_path / "one" / name, progress=False, generate=counting)
    straight = {**COMMON, "train.save_every": 2}
    finetune(finetune_config(base, data, straight), tmp_path / "one" / "straight", progress=False)

    for name, (b, options) in jobs.items():
        two = tmp_path / "rank0" / name
        assert ckpt.read_trainer_state(two)["world_size"] == 2
        assert_same_run(tmp_path / "one" / name, two, finetune_config(b, data, options))
    assert not (tmp_path / "rank1").exists()               # rank 1 wrote nothing: not even its --out
    # the class images: drawn once, by rank 0, equal to one process's; rank 1 trained on them without the cache
    assert (tmp_path / "calls0.txt").read_text() == "drawn\n" and not (tmp_path / "calls1.txt").exists()
    images = [ckpt.read_weights(run / "db" / "class_images" / "images.safetensors")[0]["images"]
              for run in (tmp_path / "one", tmp_path / "rank0")]
    assert images[0].shape == (6, 3, 8, 8) and torch.equal(images[0], images[1])
    db = tmp_path / "rank0" / "db"
    assert sorted(p.name for p in (db / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert any((db / "tensorboard").iterdir()) and (db / "adapter.json").is_file()

    # killed in step 3 and resumed under torchrun = one process straight to step 4; the resume ran steps 3 and 4
    # only: what was logged before the checkpoint is kept as it was (wall-clock times included)
    assert ckpt.read_trainer_state(killed)["step"] == STEPS and metrics(killed)[:2] == before
    assert_same_run(tmp_path / "one" / "straight", killed, finetune_config(base, data, straight))
    assert Pipeline.load(killed, device="cpu", precision="fp32").adapter is not None


def test_each_rank_takes_its_rows_of_the_global_instance_and_class_batch(bases):
    """Two ranks' inputs, side by side, are one process's inputs: instance rows then class rows, each split in
    halves; t, noise, prompts and loss factors follow their rows, and the dropout masks' rows are global."""
    _, text_base, data = bases
    cfg = finetune_config(text_base, data, {**COMMON, **DREAMBOOTH})
    pipe = Pipeline.load(text_base, device="cpu", precision="fp32")
    images, prompts = finetune_data.instance_images(cfg, pipe)
    classes = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    inputs = [FinetuneInputs(cfg, pipe, images, prompts, classes, torch.device("cpu"), dist)
              for dist in (Dist(), Dist(0, 2), Dist(1, 2))]
    half = BATCH // 2
    order = [*range(half), *range(BATCH, BATCH + half), *range(half, BATCH), *range(BATCH + half, 2 * BATCH)]
    assert inputs[1].global_rows + inputs[2].global_rows == order
    for step in (0, 1, 5):
        one, r0, r1 = (i(step) for i in inputs)
        for k in (0, 1, 2, 4):                              # x0, t, noise, loss factors
            assert torch.equal(torch.cat([r0[k], r1[k]]), one[k][order]), (step, k)
        assert r0[3]["prompts"] + r1[3]["prompts"] == [one[3]["prompts"][i] for i in order]
        assert not torch.equal(r0[0], r1[0])                # the ranks see different examples


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"batch_size=3 is the global batch and must split evenly over 2 "
                                          r"process\(es\) x grad_accum=1 micro-batches; use a multiple of 2"):
        Dist(0, 2).check_split(3)
    assert Dist(1, 2).rows(4) == slice(2, 4) and Dist().rows(4) == slice(0, 4)


def test_torchrun_on_a_device_without_a_process_group_backend_is_refused_in_one_line(monkeypatch):
    from diffusekit.training import processes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(processes, "resolve_device", lambda device: torch.device("mps"))
    with pytest.raises(ConfigError, match=r"torchrun trains on CUDA GPUs \(nccl\) or CPUs \(gloo\); mps has no "
                                          r"process-group backend, so run one process there .*--device cpu") as error:
        processes.setup_processes("mps")
    assert "\n" not in str(error.value)
