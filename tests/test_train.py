"""Training: exact resume, falling loss, checkpoints that fail loudly."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.config import load_config
from jaxlm.train.loop import train

TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=64",
        "data.seq_len=32", "data.batch_size=4", "data.max_docs=60", "data.shuffle_rows=64",
        "data.eval_fraction=0.1",
        "train.steps=20", "train.warmup_steps=2", "train.learning_rate=1e-2",
        "train.eval_every=10", "train.eval_batches=2", "train.checkpoint_every=5",
        "train.log_every=3", "mesh.devices=1"]


@pytest.fixture(scope="module")
def tokenizer_path(sp_tokenizer_file):
    return sp_tokenizer_file


def tiny_cfg(run_dir, tokenizer_path, *extra):
    return load_config(None, TINY + [f"data.tokenizer={tokenizer_path}", f"run_dir={run_dir}",
                                     *extra])


def step_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokenizer_path):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    summary = train(tiny_cfg(run_dir, tokenizer_path), progress=False)
    return run_dir, summary


def test_loss_falls(straight_run):
    _, summary = straight_run
    evals = [e["eval_loss"] for e in summary["eval"]]
    assert [e["step"] for e in summary["eval"]] == [0, 10, 20]
    assert evals[-1] < evals[0] - 0.5, evals


def test_resume_is_exact(straight_run, tmp_path, tokenizer_path):
    straight_dir, _ = straight_run
    run_dir = str(tmp_path / "resumed")
    cfg = tiny_cfg(run_dir, tokenizer_path)
    first = train(cfg, stop_after=10, progress=False)
    assert first["final_step"] == 10
    second = train(cfg, resume=True, progress=False)
    assert second["start_step"] == 10 and second["final_step"] == 20
    expected, got = step_losses(straight_dir), step_losses(run_dir)
    assert sorted(got) == list(range(1, 21))
    assert got == expected  # bit-identical: same batches, same updates
    _, p_straight = jaxlm.load(straight_dir)
    _, p_resumed = jaxlm.load(run_dir)
    jax.tree.map(np.testing.assert_array_equal, p_straight, p_resumed)


def test_checkpoint_keeps_the_run_self_contained(straight_run):
    run_dir, _ = straight_run
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.path.isfile(os.path.join(run_dir, "tokenizer.model"))
    steps = sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())
    assert steps == [10, 15, 20]  # keep_checkpoints=3
    cfg, params = jaxlm.load(run_dir)
    assert cfg.d_model == 32 and params["embed"]["tokens"].shape == (512, 32)
    assert jaxlm.load_tokenizer(run_dir).vocab_size == 512


def test_refuses_to_overwrite_a_run(straight_run, tokenizer_path):
    run_dir, _ = straight_run
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        train(tiny_cfg(run_dir, tokenizer_path), progress=False)


def test_resume_needs_a_checkpoint_and_the_same_model(straight_run, tmp_path, tokenizer_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(tiny_cfg(str(tmp_path / "new"), tokenizer_path), resume=True, progress=False)
    run_dir, _ = straight_run
    with pytest.raises(ConfigError, match="model.d_model=64 differs from the run's 32"):
        train(tiny_cfg(run_dir, tokenizer_path, "model.d_model=64"), resume=True, progress=False)


def test_missing_and_corrupt_checkpoints(straight_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxlm.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        jaxlm.load(str(tmp_path / "empty"))
    run_dir, _ = straight_run
    broken = str(tmp_path / "broken")
    shutil.copytree(run_dir, broken)
    for root, _, files in os.walk(os.path.join(broken, "checkpoints", "20")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match="step 20 .* could not be read"):
        jaxlm.load(broken)
    with open(os.path.join(broken, "config.yaml"), "w") as f:
        f.write("model: {d_model: [\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        jaxlm.load(broken)


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, TINY).model
    params = jaxlm.init_params(cfg, jax.random.key(3))
    jaxlm.save(str(tmp_path / "exported"), cfg, params)
    cfg2, params2 = jaxlm.load(str(tmp_path / "exported"))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        jaxlm.save(str(tmp_path / "exported"), cfg, params)
    # onto a file, or into a directory holding other files: one line, nothing written
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "model_dir").mkdir()
    (tmp_path / "model_dir" / "config.yaml").write_text("mine")
    for target, fmt, needle in [("a_file", "jaxlm", "is a file, not a directory"),
                                ("a_file", "hf", "is a file, not a directory"),
                                ("model_dir", "jaxlm", "already exists and is not empty")]:
        with pytest.raises(CheckpointError, match=needle) as e:
            jaxlm.save(str(tmp_path / target), cfg, params, format=fmt)
        assert "\n" not in str(e.value)
    assert (tmp_path / "a_file").read_text() == "mine"
    assert [p.name for p in (tmp_path / "model_dir").iterdir()] == ["config.yaml"]
    assert (tmp_path / "model_dir" / "config.yaml").read_text() == "mine"


def test_tensorboard_events_hold_the_logged_scalars(straight_run):
    """Event files beside metrics.jsonl, read by tensorboard's own reader, hold
    the JSONL's numbers at the same steps."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir, _ = straight_run
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir))
    events = accumulator.EventAccumulator(run_dir)
    events.Reload()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "eval_loss"):
        want = {r["step"]: r[tag] for r in rows if tag in r}
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert want and got.keys() == want.keys(), tag
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-6)
