"""Multi-host on one machine: 2 processes x 4 CPU devices (jax.distributed over
localhost, gloo collectives) train one step like 1 process x 1 device."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import xla_flags

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.sharding.distributed import initialize

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
    from test_sharding import reference
    coordinator = f"localhost:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, WORKER, coordinator, str(i),
                               str(tmp_path / f"out{i}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    _, ref_metrics, _ = reference("llama")
    for o in outs:
        assert (o["processes"], o["devices"], o["local_devices"]) == (2, 8, 4)
        np.testing.assert_allclose(o["loss"], ref_metrics["loss"], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(o["grad_norm"], ref_metrics["grad_norm"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, needle", [
    (("h:1", None, 0), "--coordinator needs --num-processes and --process-id"),
    (("h:1", 2, 2), "--process-id=2 must be in [0, --num-processes=2)"),
    (("host", 2, 0), "must be host:port"),
    ((None, 2, 0), "need --coordinator"),
])
def test_initialize_errors(args, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        initialize(*args)


def test_single_process_needs_nothing(monkeypatch):
    for k in ("SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert initialize() is False


@pytest.mark.slow  # 2-process training and resume also run in the SIGTERM test below
def test_jaxlm_train_two_processes(tmp_path, sp_tokenizer_file):
    """`jaxlm train --coordinator ...` x 2 processes: one run dir, written by process 0."""
    from jaxlm.config import load_config
    from jaxlm.train.loop import train
    args = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32",
            "data.batch_size=8", "data.max_docs=60", "data.shuffle_rows=64",
            "data.eval_fraction=0.1", "train.steps=4",
            "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1",
            "train.checkpoint_every=2", "train.log_every=1", f"data.tokenizer={sp_tokenizer_file}"]
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "XLA_FLAGS": xla_flags.for_devices(4), "JAX_PLATFORMS": "cpu"}

    def two_processes(*extra):
        coordinator = f"localhost:{_free_port()}"
        procs = [subprocess.Popen(
            [sys.executable, "-m", "jaxlm.scripts.cli", "train", "--config", "tiny-llama",
             "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
             *args, f"run_dir={tmp_path / 'run'}", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        logs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), logs

    two_processes()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
    two_processes("train.steps=6", "--resume")  # each process gets its own data state back
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4", "6"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one writer
    # the eval batches are the same in any layout: step 0 matches one process
    single = train(load_config("tiny-llama", args + [f"run_dir={tmp_path / 'one'}"]),
                   stop_after=1, progress=False)
    np.testing.assert_allclose(rows[0]["eval_loss"], single["eval"][0]["eval_loss"], rtol=1e-5)
    # A single process restores the two-process checkpoint, into another mesh shape.
    import jax
    import jaxlm
    from jaxlm.model import model_specs
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.sharding.rules import partition_spec, use_mesh
    from jaxlm.train import checkpoint
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.state import abstract_state
    cfg = load_config("tiny-llama", args + [f"run_dir={tmp_path / 'run'}", "mesh.data=2",
                                            "mesh.fsdp=4"])
    _, params = jaxlm.load(str(tmp_path / "run"))  # unsharded, on one device
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train, model_specs(cfg.model))
    mngr = checkpoint.manager(str(tmp_path / "run"), read_only=True)
    with use_mesh(mesh, cfg.mesh.rules):
        state, _ = checkpoint.restore_state(mngr, abstract_state(cfg, mesh, tx))
    assert int(state.step) == 6
    with pytest.raises(CheckpointError, match="written by 2 processes; resume it with 2"):
        train(cfg, resume=True, progress=False)
    q = state.params["layers"]["attn"]["q"]
    assert q.sharding.spec == partition_spec(("layers", "embed", "heads", "head_dim"),
                                             cfg.mesh.rules)
    assert q.sharding.mesh.shape == {"stage": 1, "data": 2, "fsdp": 4, "context": 1, "expert": 1,
                                     "tensor": 1}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, state.params)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, sp_tokenizer_file):
    """A preemption that reaches only process 1: both processes agree on the stop
    step (one allgather every train.log_every steps), save it, and exit 0; the
    2-process resume continues from it, and ends with the losses and params of an
    uninterrupted 2-process run."""
    import signal
    import time
    from jaxlm.train import checkpoint
    run_dir = tmp_path / "run"
    args = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "model.n_kv_heads=1", "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32",
            "data.batch_size=8", "data.max_docs=20", "data.shuffle_rows=64", "train.warmup_steps=1",
            "train.eval_every=100000", "train.eval_batches=1", "train.checkpoint_every=100000",
            "train.log_every=2", "train.min_lr_ratio=1.0",
            "train.peak_flops=1e12",  # no matmul timing at each of the 6 start-ups
            f"data.tokenizer={sp_tokenizer_file}", f"run_dir={run_dir}"]
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "XLA_FLAGS": xla_flags.for_devices(4), "JAX_PLATFORMS": "cpu"}

    def start(*extra):
        coordinator = f"localhost:{_free_port()}"
        return [subprocess.Popen(
            [sys.executable, "-m", "jaxlm.scripts.cli", "train", "--config", "tiny-llama",
             "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
             *args, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for i in range(2)]

    def logged():
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        return [json.loads(x)["step"] for x in lines if x.endswith("\n") and '"loss"' in x]

    procs = start("train.steps=100000")
    end = time.monotonic() + 300
    while len(logged()) < 4:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.monotonic() < end, "timed out waiting for step 4"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # not the writer of the run dir
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    line = [x for x in outs[0][1].splitlines() if x.strip()][-1]
    assert line.startswith("stopped by SIGTERM: saved a checkpoint of step "), line
    stopped = int(line.split("step ")[1].split(";")[0])
    assert stopped % 2 == 0 and checkpoint.latest_step(str(run_dir)) == stopped
    assert logged() == list(range(1, stopped + 1))
    # the 2-process resume runs to the end; min_lr_ratio=1 keeps the learning rate constant
    # after warm-up, so train.steps may grow without changing the schedule of the steps run
    final = stopped + 4
    procs = start(f"train.steps={final}", "--resume")
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    assert logged() == list(range(1, final + 1))  # resumed right after the stop step
    resumed = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x]
    # an uninterrupted 2-process run of the same steps: the same losses and final params
    preempted_dir, run_dir = run_dir, tmp_path / "straight"
    args[-1] = f"run_dir={run_dir}"
    procs = start(f"train.steps={final}")
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    straight = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    import jax
    import jaxlm
    _, a = jaxlm.load(str(preempted_dir))
    _, b = jaxlm.load(str(run_dir))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
