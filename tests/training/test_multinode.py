"""Past one machine: two torchrun "nodes" on the loopback interface (c10d rendezvous) and `accelerate
launch` drive the same entry point, `python -m diffusekit.train`, and train what one process trains.

Every random draw of a step is made for the global batch from (seed, step) and each rank takes its
slice (train_inputs.py), so the only difference left between world sizes is the order of float32
reductions (DDP's all-reduce of gradients, the loss mean). `assert_same_training` says how close
that is and why. Only loopback addresses are used.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusekit import store as ckpt
from diffusekit.store.run_config import RunConfig
from diffusekit.training import train
from test_training_diffusion import tiny_run

LAUNCH_TIMEOUT_S = 240       # generous: a loaded 2-core machine takes ~20 s to import torch in each process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(tmp_path) -> dict:
    """The environment for launched trainers: one thread each, gloo on the loopback interface only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}   # no user accelerate config
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback[0]
    return env


def start_all(commands: list[list[str]], env: dict, timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, str]]:
    """Start the commands at once (the "nodes"), wait for all; (exit status, output) of each."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for c in commands]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def launch(commands: list[list[str]], env: dict, timeout: float = LAUNCH_TIMEOUT_S) -> list[str]:
    """start_all, failing on any non-zero exit status; the outputs."""
    results = start_all(commands, env, timeout)
    for c, (code, out) in zip(commands, results):
        assert code == 0, f"{' '.join(c)} exited with {code}:\n{out[-4000:]}"
    return [out for _, out in results]


def two_nodes(port: int) -> list[str]:
    """torchrun for one of two "nodes" of one process each, meeting through the c10d rendezvous on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "diffusekit-test",
            "--local_addr", "127.0.0.1", "--max_restarts", "0"]


def entry_point(config, out) -> list[str]:
    """The arguments every launcher hands to the trainer module."""
    return ["-m", "diffusekit.train", "--config", str(config), "--out", str(out), "--no-progress"]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_training(run_a, run_b, cfg) -> None:
    """Two runs of cfg trained the same weights, losses and gradient norms up to float32 reduction order.

    Tolerances. A wrong batch, slice or scaling changes each AdamW update by O(lr) (the update
    m_hat / sqrt(v_hat) is about +-1 per weight), so after n steps it shows at the scale of lr * n.
    Reordering float32 sums changes a gradient by ~1e-7 relative (a few ulps per partial sum), which
    Adam passes on as a ~1e-7 relative change of the update. atol = 1e-3 * lr * n sits about four
    orders above rounding (measured ~1e-5 * lr * n) and three below a real difference. The loss and
    the pre-clip gradient norm are sums of ~1e3-1e4 float32 terms: rtol 1e-4 (a bug that forgets to
    average over micro-batches or ranks changes them by a factor of 2 or more). The weights alone
    would miss that bug: gradient clipping and Adam's m / sqrt(v) both undo a uniform scale.
    """
    tc = cfg.train
    a, b = (load_file(run / ckpt.RAW_FILE) for run in (run_a, run_b))
    assert a.keys() == b.keys()
    atol = 1e-3 * tc.lr * tc.steps
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    ma, mb = metrics(run_a), metrics(run_b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, tc.steps + 1))
    for ra, rb in zip(ma, mb):
        for key in ("loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), (key, ra["step"], ra[key], rb[key])


def reference_run(tmp_path, cfg):
    """cfg trained by one process, in this one; and cfg written as the launchers' --config."""
    config = tmp_path / "run.json"
    cfg.to_json(config)
    train(cfg, tmp_path / "single", progress=False)
    return config, tmp_path / "single"


def tiny_distributed_run(**kw):
    # log every step so the per-step loss and gradient norm are compared, not only the end
    return tiny_run(**{"steps": 5, "batch_size": 16, "log_every": 1, "save_every": 5, **kw})


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_on_loopback_equal_one_process(tmp_path):
    cfg = tiny_distributed_run()
    config, single = reference_run(tmp_path, cfg)
    port, nodes = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    # two launchers, as on two machines; the c10d rendezvous assigns the node ranks
    launch([two_nodes(port) + entry_point(config, out) for out in nodes], loopback_env(tmp_path))
    # rank 0 (whichever node the rendezvous made it) wrote the run; the other node wrote no checkpoint
    written = [out for out in nodes if (out / ckpt.STATE_FILE).exists()]
    assert len(written) == 1, [sorted(p.name for p in out.iterdir()) if out.exists() else None for out in nodes]
    assert ckpt.read_trainer_state(written[0])["world_size"] == 2
    assert_same_training(single, written[0], cfg)


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_entry_point(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    cfg = tiny_distributed_run()
    config, single = reference_run(tmp_path, cfg)
    out = tmp_path / "accelerate"
    # --multi_gpu is accelerate's name for its torchrun launcher, and it runs CPU processes too (the
    # config says device="cpu", so the trainer joins with gloo). `--cpu --num_processes 2` would
    # start ONE process (accelerate's multi-CPU path needs MPI), silently at world size 1.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    launch([accelerate + entry_point(config, out)], loopback_env(tmp_path))
    assert ckpt.read_trainer_state(out)["world_size"] == 2
    assert_same_training(single, out, cfg)


@pytest.mark.slow
def test_resume_refuses_a_run_folder_that_only_one_node_sees(tmp_path):
    cfg = tiny_distributed_run(steps=4)
    train(cfg, tmp_path / "node0", progress=False)      # a checkpoint at step 4 on one "machine" only
    longer = RunConfig.from_dict({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "steps": 8}})
    config = tmp_path / "run8.json"
    longer.to_json(config)
    port, nodes = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    # without the check the node holding rank 0 can wait minutes at torchrun's exit barrier: a bounded wait
    results = start_all([two_nodes(port) + entry_point(config, out) + ["--resume"] for out in nodes],
                        loopback_env(tmp_path), timeout=150)
    for code, out in results:
        assert code != 0 and "see different checkpoints" in out and "same run directory" in out, out[-3000:]
    assert ckpt.read_trainer_state(nodes[0])["step"] == 4        # the checkpoint is left as it was
    assert not (nodes[1] / ckpt.STATE_FILE).exists()
