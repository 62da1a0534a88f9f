"""Nothing lost, nothing silently wrong: signals, kills, concurrent runs, corrupt
checkpoints, diverging runs, batch-infer reruns, and bad input at every door.

Where the behaviour is the command's (a kill, a signal, a second run, a corrupt
checkpoint) the real `jaxlm` command runs as a subprocess; the tests wait on
files the child writes (with a deadline), never on wall-clock guesses.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import CheckpointError, ConfigError, InputError, JaxlmError
from jaxlm.config import load_config
from jaxlm.scripts import cli
from jaxlm.infer.batch import batch_infer, row_seed
from jaxlm.train import checkpoint, guard
from jaxlm.train.loop import train
from jaxlm.train.metrics import MetricsLog
import tiny_models

TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "model.n_kv_heads=1", "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32",
        "data.batch_size=2", "data.max_docs=20", "data.shuffle_rows=64",
        "train.steps=6", "train.warmup_steps=1",
        "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=3",
        "train.log_every=1", "mesh.devices=1",
        # a given MFU peak: no second of matmul timing at each `jaxlm train` start-up
        # (tests/test_metrics.py covers the measurement)
        "train.peak_flops=1e12"]
LONG = ["train.steps=100000", "train.eval_every=100000", "train.log_every=3"]
DEADLINE = 240.0


@pytest.fixture(scope="module")
def tok(sp_tokenizer_file):
    return sp_tokenizer_file


def overrides(tok, run_dir, *extra):
    """TINY with the run's tokenizer and dir, then `extra`, whose keys replace earlier
    values (the command line refuses a key given twice)."""
    merged = {}
    for o in [*TINY, f"data.tokenizer={tok}", f"run_dir={run_dir}", *extra]:
        merged[o.split("=", 1)[0]] = o
    return list(merged.values())


def cfg_of(tok, run_dir, *extra):
    return load_config("tiny-llama", overrides(tok, run_dir, *extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok):
    """A finished 6-step run with checkpoints 3 and 6."""
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    train(cfg_of(tok, run_dir), progress=False)
    return run_dir


# ------------------------------------------------------------------ helpers

def cli_args(*args):
    return [sys.executable, "-m", "jaxlm.scripts.cli", *args]


def run_cli(*args, timeout=DEADLINE):
    return subprocess.run(cli_args(*args), capture_output=True, text=True, timeout=timeout)


def start_train(tok, run_dir, *extra):
    return subprocess.Popen(cli_args("train", "--config", "tiny-llama",
                                     *overrides(tok, run_dir, *extra)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, what, proc=None, deadline=DEADLINE):
    """Poll `predicate` (a file the child writes) until true, the child exits, or
    the deadline passes."""
    end = time.monotonic() + deadline
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged_steps(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line, parse_constant=_no_constant)["step"]
                for line in f if line.endswith("\n") and '"loss"' in line]


def _no_constant(name):
    raise AssertionError(f"metrics.jsonl holds a bare {name} token")


def last_line(proc_stderr):
    lines = [line for line in proc_stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]


def assert_claim_matches_disk(proc, run_dir):
    """rc 130, no traceback, and the saved step claimed (or not) is what is on disk."""
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    line = last_line(proc.stderr)
    if "no checkpoint was saved" in line:
        assert checkpoint.latest_step(run_dir) is None, line
        return None
    assert line.startswith("interrupted: saved a checkpoint of step "), line
    step = int(line.split("step ")[1].split(";")[0])
    assert checkpoint.latest_step(run_dir) == step
    jaxlm.load(run_dir, step=step)  # readable
    return step


# --------------------------------------------- signals, kills, two runs on a dir

def test_second_run_refused_ctrl_c_saves_and_flushes(tok, tmp_path):
    run_dir = str(tmp_path / "run")
    a = start_train(tok, run_dir, *LONG, "train.checkpoint_every=100000")
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, "step 3 logged", a)
    b = run_cli("train", "--config", "tiny-llama", *overrides(tok, run_dir))
    assert_one_line_error(b, f"is in use by another jaxlm train (pid {a.pid} on host "
                          f"{socket.gethostname()})")
    a.send_signal(signal.SIGINT)
    _, err = a.communicate(timeout=DEADLINE)
    a.stderr = None
    proc = subprocess.CompletedProcess(a.args, a.returncode, "", err)
    step = assert_claim_matches_disk(proc, run_dir)
    assert step is not None and step >= 3
    assert logged_steps(run_dir) == list(range(1, step + 1))  # the pending steps too


def test_a_start_up_signal_swallowed_in_a_gc_callback_stops_at_arm(capfd):
    """Python only reports an exception raised in a gc callback (jax registers one):
    the start-up Ctrl-C is not lost, `arm` raises it, and nothing is printed."""
    import gc

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the finalizer

    with guard.stop_signals() as request:
        cycle = Finalized()
        cycle.self = cycle
        del cycle
        gc.collect()
        assert request.signum == signal.SIGINT and not request.armed
        with pytest.raises(KeyboardInterrupt):
            request.arm()
    assert "Traceback" not in capfd.readouterr().err


def test_ctrl_c_in_start_up_claims_no_save(tok, tmp_path):
    run_dir = str(tmp_path / "run")
    a = start_train(tok, run_dir, *LONG)
    lock = os.path.join(run_dir, guard.LOCK_FILE)
    wait_for(lambda: os.path.exists(lock) and os.path.getsize(lock) > 0, "the lock", a)
    a.send_signal(signal.SIGINT)
    _, err = a.communicate(timeout=DEADLINE)
    assert_claim_matches_disk(subprocess.CompletedProcess(a.args, a.returncode, "", err),
                              run_dir)


def assert_preempted(rc, err, run_dir):
    """SIGTERM: exit 0, no traceback, and the step claimed is the latest on disk."""
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err, err
    line = last_line(err)
    assert line.startswith("stopped by SIGTERM: saved a checkpoint of step "), line
    assert "resumable" in line, line
    step = int(line.split("step ")[1].split(";")[0])
    assert checkpoint.latest_step(run_dir) == step
    return step


def test_sigterm_then_ctrl_c_during_the_save(tok, tmp_path):
    run_dir = str(tmp_path / "run")
    a = start_train(tok, run_dir, *LONG, "train.checkpoint_every=100000")
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, "step 3 logged", a)
    a.send_signal(signal.SIGTERM)
    a.send_signal(signal.SIGINT)  # a second signal at once: must not tear the save
    _, err = a.communicate(timeout=DEADLINE)
    step = assert_preempted(a.returncode, err, run_dir)
    assert step >= 3
    jaxlm.load(run_dir, step=step)  # readable


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow  # test_multihost's SIGTERM test does this across two processes (stop at a
# step, save, exit 0, resume to the uninterrupted run's losses and params), and
# test_sigterm_then_ctrl_c_during_the_save covers the single-process signal path
def test_sigterm_preemption_exits_0_and_resumes_exactly(tok, tmp_path):
    """A preempted run (SIGTERM mid-run), resumed, equals an uninterrupted run:
    the same losses at every step and bit-identical final params."""
    run_dir, ref_dir = str(tmp_path / "run"), str(tmp_path / "ref")
    a = start_train(tok, run_dir, *LONG, "train.checkpoint_every=100000")
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, "step 3 logged", a)
    a.send_signal(signal.SIGTERM)
    _, err = a.communicate(timeout=DEADLINE)
    stopped = assert_preempted(a.returncode, err, run_dir)
    assert logged_steps(run_dir) == list(range(1, stopped + 1))  # the pending steps too
    end = stopped + 3
    extra = (*LONG, "train.checkpoint_every=100000")
    train(cfg_of(tok, run_dir, *extra), resume=True, stop_after=end, progress=False)
    train(cfg_of(tok, ref_dir, *extra), stop_after=end, progress=False)
    assert losses(run_dir) == losses(ref_dir)
    assert [s for s, _ in losses(run_dir)] == list(range(1, end + 1))
    _, got = jaxlm.load(run_dir, step=end)
    _, want = jaxlm.load(ref_dir, step=end)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_kill_9_then_resume(tok, tmp_path):
    run_dir = str(tmp_path / "run")
    a = start_train(tok, run_dir, *LONG, "train.checkpoint_every=3")
    wait_for(lambda: checkpoint.latest_step(run_dir) is not None, "a checkpoint", a)
    a.kill()
    a.communicate(timeout=DEADLINE)
    assert os.path.exists(os.path.join(run_dir, guard.LOCK_FILE))  # stale, not a lock
    latest = checkpoint.latest_step(run_dir)
    train(cfg_of(tok, run_dir, f"train.steps={latest + 2}", "train.checkpoint_every=3"),
          resume=True, progress=False)
    steps = logged_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-2:] == [latest + 1, latest + 2]


def _du(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_a_full_disk_is_one_line_and_the_run_resumes_on_a_larger_one(tok, tmp_path):
    """A tmpfs that holds one checkpoint but not two: step 3 is saved, step 6 does not
    fit. One `error:` line naming the run dir, the bytes a checkpoint needs and the
    intact step; exit 2, no traceback. The run dir copied to a larger disk resumes to
    the losses of an uninterrupted run."""
    import shutil
    straight = str(tmp_path / "straight")
    train(cfg_of(tok, straight), progress=False)  # 6 steps, checkpoints at 3 and 6
    one = _du(os.path.join(straight, "checkpoints", "3"))
    rest = _du(straight) - _du(os.path.join(straight, "checkpoints"))
    small = tmp_path / "small"
    small.mkdir()
    size = rest + int(1.5 * one) + 256 * 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (it needs root)")
    try:
        run_dir = str(small / "run")
        proc = run_cli("train", "--config", "tiny-llama", *overrides(tok, run_dir))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
        assert f"no space left on the device of {run_dir}: a checkpoint needs about" in \
            errors[0] and "the latest checkpoint, step 3, is intact" in errors[0], errors[0]
        assert checkpoint.latest_step(run_dir) == 3
        moved = str(tmp_path / "moved")
        shutil.copytree(run_dir, moved)
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
    train(cfg_of(tok, moved), resume=True, progress=False)
    assert losses(moved) == losses(straight)


def test_run_dir_errors_are_one_line(tok, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(run_cli("train", "--config", "tiny-llama",
                                  *overrides(tok, str(a_file))), "is a file, not a directory")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert_one_line_error(run_cli("train", "--config", "tiny-llama",
                                      *overrides(tok, str(ro / "run"))), "cannot write run_dir")
    assert_one_line_error(_coordinator_error(tok, tmp_path), "no coordinator answered within 1s")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _coordinator_error(tok, tmp_path):
    """The waiting line goes first; the error is the last, and the only error."""
    proc = run_cli("train", "--config", "tiny-llama", "--coordinator",
                   f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1",
                   "--coordinator-timeout", "1", *overrides(tok, str(tmp_path / "co")))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and "waiting up to 1s for the coordinator" in lines[0], proc.stderr
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", lines[-1])


# ------------------------------------------------------------ divergence

def test_divergence_never_saves_a_non_finite_state(tok, tmp_path):
    """Every update non-finite (learning rate inf): each step is skipped, the run
    stops with one line after train.max_skipped_steps in a row, and every
    checkpoint holds the untouched (finite) initial params."""
    run_dir = str(tmp_path / "run")
    with pytest.raises(JaxlmError) as e:
        train(cfg_of(tok, run_dir, "train.learning_rate=inf", "train.checkpoint_every=2",
                     "train.log_every=1", "train.steps=30", "train.max_skipped_steps=5"),
              progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("training diverged at step 5: 5 non-finite steps in a row"), message
    assert "latest checkpoint: step 4" in message, message
    mngr = checkpoint.manager(run_dir, read_only=True)
    assert mngr.all_steps() == [2, 4]
    _, first = jaxlm.load(run_dir, step=2)
    for step in mngr.all_steps():
        _, params = jaxlm.load(run_dir, step=step)
        assert guard.all_finite(params), step
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(first)):  # nothing applied
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    logged_steps(run_dir)  # strict JSON: no bare NaN/Infinity
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert [r["skipped"] for r in rows] == [1] * 5
    assert [r["consecutive_skipped"] for r in rows] == [1, 2, 3, 4, 5]


def test_save_guard_and_detection_units(tmp_path):
    assert guard.all_finite({"a": jnp.ones(3), "n": jnp.arange(3)})
    assert not guard.all_finite({"a": jnp.array([1.0, jnp.nan])})
    from jaxlm.train.loop import _check_diverged
    _check_diverged([(1, {"loss": 1.0, "grad_norm": 2.0, "consecutive_skipped": 0})], 3)
    _check_diverged([(1, {"loss": math.nan, "grad_norm": 2.0, "consecutive_skipped": 2})], 3)
    with pytest.raises(JaxlmError, match="step 2: 3 non-finite steps .*last: grad_norm is inf"):
        _check_diverged([(1, {"loss": 1.0, "grad_norm": math.nan, "consecutive_skipped": 2}),
                         (2, {"loss": 1.0, "grad_norm": math.inf, "consecutive_skipped": 3})], 3)
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    log.write({"step": 1, "loss": float("nan"), "v": np.array([1.0, np.inf])})
    log.close()
    assert json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=_no_constant) == {
        "step": 1, "loss": None, "v": [1.0, None]}


def test_metrics_after_resume_from_an_earlier_step_are_not_duplicated(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": s, "loss": 1.0} for s in range(1, 7)] + [{"step": 3, "eval_loss": 2.0}]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    assert guard.truncate_metrics(path, 3) == 4
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 3]


# ---------------------------------------------------------- corrupt checkpoints

def _corrupt(src, dst, how):
    shutil.copytree(src, dst)
    state = os.path.join(dst, "checkpoints", "6", "state")
    for root, _, files in os.walk(state):
        for name in files:
            path = os.path.join(root, name)
            if how == "truncate" and os.sep + "d" + os.sep in path:
                with open(path, "r+b") as f:
                    f.truncate(10)
            if how == "manifest" and name == "manifest.ocdbt":
                os.remove(path)
    return dst


@pytest.mark.parametrize("how", ["truncate", "manifest"])
def test_corrupt_latest_checkpoint_names_the_intact_step(trained, tmp_path, how):
    broken = _corrupt(trained, str(tmp_path / "broken"), how)
    with pytest.raises(CheckpointError, match=r"step 6 .* could not be read .*step 3 is intact"):
        jaxlm.load(broken)
    jaxlm.load(broken, step=3)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 4 .*steps: 3, 6"):
        jaxlm.load(broken, step=4)


def test_corrupt_checkpoint_on_the_command_line_then_resume_an_earlier_step(trained, tok,
                                                                            tmp_path):
    broken = _corrupt(trained, str(tmp_path / "broken"), "truncate")
    assert_one_line_error(run_cli("generate", "--checkpoint", broken, "--prompt", "def"),
                          "step 3 is intact: choose it with --step 3")
    assert_one_line_error(run_cli("train", "--config", "tiny-llama", "--resume",
                                  *overrides(tok, broken)),
                          "choose it with --resume --step 3")
    train(cfg_of(tok, broken), resume=True, step=3, progress=False)
    assert logged_steps(broken) == [1, 2, 3, 4, 5, 6]
    assert checkpoint.latest_step(broken) == 6
    assert os.path.isdir(os.path.join(broken, checkpoint.SET_ASIDE, "6"))
    jaxlm.load(broken)


# ------------------------------------------------------------------ batch-infer

PROMPTS = ["def main():", "import os", "class Foo(object):", "return None", "def main():",
           "x = [1, 2, 3]", "try:"]
SAMPLE = ["generate.max_new_tokens=6", "generate.temperature=1.0", "generate.top_k=0"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    with open(path) as f:
        return {json.loads(line)["id"]: json.loads(line) for line in f}


@pytest.fixture(scope="module")
def bi_full(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("bi")
    inp, out = str(d / "in.jsonl"), str(d / "out.jsonl")
    write_jsonl(inp, [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    batch_infer(trained, inp, out, batch_size=4, overrides=SAMPLE, progress=False)
    return inp, out


def test_sampled_outputs_do_not_depend_on_batching_or_resumption(trained, bi_full, tmp_path):
    inp, full_out = bi_full
    full = {k: r["tokens"] for k, r in read_jsonl(full_out).items()}
    assert full["p0"] != full["p4"]  # the same prompt under two ids: two samples
    other = str(tmp_path / "bs3.jsonl")
    batch_infer(trained, inp, other, batch_size=3, overrides=SAMPLE, progress=False)
    assert {k: r["tokens"] for k, r in read_jsonl(other).items()} == full
    with open(full_out, "rb") as f:
        lines = f.read().split(b"\n")
    torn = str(tmp_path / "torn.jsonl")  # what a kill mid-write leaves
    with open(torn, "wb") as f:
        f.write(b"\n".join(lines[:3]) + b"\n" + lines[3][:20])
    s = batch_infer(trained, inp, torn, batch_size=2, overrides=SAMPLE, progress=False)
    assert s["skipped"] == 3
    assert {k: r["tokens"] for k, r in read_jsonl(torn).items()} == full


def test_batch_infer_killed_and_resumed_on_the_command_line(trained, bi_full, tmp_path):
    inp, full_out = bi_full
    out = str(tmp_path / "out.jsonl")
    args = ("batch-infer", "--checkpoint", trained, "--input", inp, "--output", out,
            "--batch-size", "1", *SAMPLE)
    child = subprocess.Popen(cli_args(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for(lambda: os.path.exists(out) and os.path.getsize(out) > 0 or child.poll() is not None,
             "a first output line")
    child.kill()
    child.communicate(timeout=DEADLINE)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    got, want = read_jsonl(out), read_jsonl(full_out)
    assert list(got) == list(want) or sorted(got) == sorted(want)
    assert {k: r["tokens"] for k, r in got.items()} == {k: r["tokens"] for k, r in want.items()}


def test_batch_infer_rerun_with_a_changed_prompt_or_settings(trained, bi_full, tmp_path):
    inp, full_out = bi_full
    out = str(tmp_path / "out.jsonl")
    shutil.copy(full_out, out)
    changed = str(tmp_path / "in.jsonl")
    write_jsonl(changed, [{"id": f"p{i}", "prompt": p + (" pass" if i == 1 else "")}
                          for i, p in enumerate(PROMPTS)])
    with pytest.raises(InputError, match=r"id 'p1' \(.*line 2\): its prompt changed"):
        batch_infer(trained, changed, out, overrides=SAMPLE, progress=False)
    assert_one_line_error(run_cli("batch-infer", "--checkpoint", trained, "--input", inp,
                                  "--output", out, "generate.seed=1", *SAMPLE),
                          "the checkpoint or generate settings changed")
    s = batch_infer(trained, changed, out, overrides=SAMPLE, progress=False,
                    on_change="regenerate")
    assert (s["prompts"], s["regenerated"]) == (1, 1)
    rows = read_jsonl(out)
    assert rows["p1"]["prompt"] == "import os pass" and len(rows) == len(PROMPTS)
    assert batch_infer(trained, changed, out, overrides=SAMPLE, progress=False)["prompts"] == 0


def test_batch_infer_path_and_length_errors(trained, bi_full, tmp_path):
    inp, _ = bi_full
    for output, needle in [(inp, "is the --input file"), (str(tmp_path), "is a directory"),
                           (str(tmp_path / "no" / "out.jsonl"), "does not exist")]:
        with pytest.raises(InputError, match=needle):
            batch_infer(trained, inp, output, overrides=SAMPLE, progress=False)
    long_in = str(tmp_path / "long.jsonl")
    write_jsonl(long_in, [{"id": "ok", "prompt": "x"}, {"id": "big", "prompt": "x = 1\n" * 40}])
    with pytest.raises(InputError, match=r"long.jsonl line 2 \(id 'big'\): the prompt has"):
        batch_infer(trained, long_in, str(tmp_path / "o.jsonl"), overrides=SAMPLE,
                    progress=False)


def test_row_seed_is_a_stable_31_bit_hash():
    assert row_seed("a") == row_seed("a") != row_seed("b")
    assert all(0 <= row_seed(i) < 2 ** 31 for i in ("a", 1, [1, 2], {"k": 1}))
    assert row_seed(1) != row_seed("1")


def test_generate_row_seeds(trained):
    cfg, params = jaxlm.load(trained)
    kw = dict(max_new_tokens=5, temperature=1.0)
    both = jaxlm.generate(params, cfg, [[1, 5, 9], [1, 5, 9]], row_seeds=[7, 8], **kw)
    swapped = jaxlm.generate(params, cfg, [[1, 5, 9], [1, 5, 9]], row_seeds=[8, 7], **kw)
    assert both.sequences() == swapped.sequences()[::-1]  # the seed, not the position
    assert both.sequences()[0] != both.sequences()[1]
    with pytest.raises(InputError, match="row_seeds"):
        jaxlm.generate(params, cfg, [[1, 5, 9]], row_seeds=[1, 2], **kw)


# ------------------------------------------------------------ the public API

def test_api_inputs_are_validated(trained, tok):
    cfg, params = jaxlm.load(trained)
    tokens = jnp.array([[1, 2, 3]])
    for bad in (cfg.vocab_size, -1):
        with pytest.raises(InputError, match=f"id {bad}, outside"):
            jaxlm.forward(params, cfg, jnp.array([[1, bad]]))
    jax.jit(lambda t: jaxlm.forward(params, cfg, t)[0])(tokens)  # traced: not checked
    learned = dataclasses.replace(tiny_models.GPT2, max_seq_len=8)  # learned positions
    lp = jaxlm.init_params(learned, jax.random.key(0))
    with pytest.raises(InputError, match="9 positions, more than model.max_seq_len=8"):
        jaxlm.forward(lp, learned, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(InputError, match="another config|no \\["):
        jaxlm.forward(lp, cfg, tokens)
    with pytest.raises(InputError, match="generate: params"):
        jaxlm.generate(lp, cfg, [[1, 2]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="cfg is a Config"):
        jaxlm.forward(params, load_config("tiny-llama"), tokens)
    with pytest.raises(CheckpointError, match="path must be"):
        jaxlm.load(None)
    with pytest.raises(ConfigError, match="overrides must be a list"):
        jaxlm.load_config("tiny-llama", "a=b")
    with pytest.raises(InputError, match="decode: id 100000"):
        jaxlm.load_tokenizer(trained).decode([1, 100000])


def test_generate_model_overrides(trained):
    from jaxlm.infer.text import apply_model_overrides
    cfg, _ = jaxlm.load(trained)
    assert apply_model_overrides(cfg, ["model.attention_impl=xla"]).attention_impl == "xla"
    with pytest.raises(ConfigError, match="model.d_model: changes the checkpoint's"):
        apply_model_overrides(cfg, ["model.attention_impl=xla", "model.d_model=64"])


# --------------------------------------------------- one-line command errors

def test_command_errors_are_one_line(trained, tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    bad_text = tmp_path / "bad.txt"
    bad_text.write_bytes(b"\xff\xfe\n")
    hf_dir = str(tmp_path / "hf")
    assert cli.main(["convert", "--input", trained, "--output", hf_dir, "--to", "hf"]) == 0
    no_json, bad_json = str(tmp_path / "nojson"), str(tmp_path / "badjson")
    shutil.copytree(hf_dir, no_json)
    os.remove(os.path.join(no_json, "config.json"))
    shutil.copytree(hf_dir, bad_json)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    with open(os.path.join(bad_json, "config.json"), "w") as f:
        json.dump(dict(hf_config, hidden_size="wide"), f)
    capsys.readouterr()
    cases = [
        (["train", "--config", str(listed)], "the top level must be a mapping"),
        (["train", "--config", str(tmp_path)], "is a directory, not a YAML file"),
        (["generate", "--checkpoint", trained, "--prompts-file", str(bad_text)],
         "is not UTF-8 text"),
        (["generate", "--checkpoint", trained, "--prompts-file", str(tmp_path)],
         "cannot read --prompts-file"),
        (["convert", "--input", no_json, "--output", str(tmp_path / "o1"), "--to", "jaxlm"],
         "config.json is missing"),
        (["convert", "--input", bad_json, "--output", str(tmp_path / "o2"), "--to", "jaxlm"],
         "config.json: a field has the wrong type"),
        (["plan", "--config", "tiny-llama", "--devices", "-4"], "--devices=-4 must be >= 1"),
        (["plan", "--config", "tiny-llama", "--devices", "0"], "--devices=0 must be >= 1"),
        (["generate", "--checkpoint", trained, "--prompt", "x", "model.n_layers=3"],
         "model.n_layers: changes the checkpoint's parameter shapes"),
    ]
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            (argv, err)


def test_os_errors_become_one_line():
    assert cli.error_line(IsADirectoryError(21, "Is a directory", "/x")) == "/x: Is a directory"
    assert cli.error_line(PermissionError(13, "Permission denied", "/r")) == \
        "/r: Permission denied"
    assert "not valid UTF-8" in cli.error_line(_decode_error())
    assert cli.error_line(RuntimeError("bug")) is None  # a bug keeps its traceback


def _decode_error():
    try:
        b"\xff".decode("utf-8")
    except UnicodeDecodeError as e:
        return e


def test_hf_export_uses_the_umask_and_load_is_quiet(trained, tmp_path, caplog):
    cfg, params = jaxlm.load(trained)
    old = os.umask(0o022)
    try:
        out = os.path.dirname(jaxlm.save(str(tmp_path / "hf"), cfg, params, format="hf"))
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o755
    for name in os.listdir(out):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o644, name
    with caplog.at_level("WARNING", logger="absl"):
        jaxlm.load(trained)
    assert not [r for r in caplog.records if "read only" in r.getMessage()]


def test_a_single_text_file_corpus_trains(tok, tmp_path):
    import inspect
    corpus = tmp_path / "one.txt"
    corpus.write_text(inspect.getsource(json.decoder) + inspect.getsource(json.encoder))
    summary = train(cfg_of(tok, str(tmp_path / "run"), f"data.corpus={corpus}",
                           "train.steps=1", "train.eval_every=1", "data.eval_fraction=0.1"),
                    progress=False)
    assert [e["step"] for e in summary["eval"]] == [0, 1]
    assert all(math.isfinite(e["eval_loss"]) for e in summary["eval"])
