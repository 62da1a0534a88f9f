"""`jaxlm eval`: perplexity of text / JSONL files on one device and sharded on 8 CPU
devices (4 data x 2 tensor: the same numbers, the rows split over the data axis), the
JSON result beside a run's metrics, a local lm-eval task, and one-line errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxlm.scripts.cli import main

pytest.importorskip("lm_eval")

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n" * 6
LINES = ["import os\nprint(os.sep)\n", "x = [1, 2, 3]\n"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    (d / "a.txt").write_text(TEXT)
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in LINES) + "\n")
    (d / "empty.txt").write_text("")
    return d


def run(capsys, *argv):
    rc = main(["eval", *map(str, argv)])
    return rc, capsys.readouterr()


def test_sharded_eval_gives_the_single_device_numbers(tiny_checkpoint, files, tmp_path,
                                                      capsys, monkeypatch):
    from jaxlm.infer import score
    ck = tiny_checkpoint("llama")
    data = [files / "a.txt", files / "b.jsonl"]
    rc, _ = run(capsys, "--checkpoint", ck, "--data", *data, "--stride", 16,
                "--output", tmp_path / "one.json", "mesh.devices=1")
    assert rc == 0
    seen = []
    put = score.put_rows

    def spy(arrays, mesh, rules):
        out = put(arrays, mesh, rules)
        seen.append(out[0])
        return out

    monkeypatch.setattr(score, "put_rows", spy)
    run_dir = tmp_path / "run"
    shutil.copytree(ck, run_dir)
    rc, cap = run(capsys, "--checkpoint", run_dir, "--data", *data, "--stride", 16,
                  "mesh.data=4", "mesh.tensor=2")
    assert rc == 0 and "perplexity" in cap.out and "bits/byte" in cap.out
    one = json.loads((tmp_path / "one.json").read_text())["perplexity"]
    eight = json.loads((run_dir / "eval-step-0.json").read_text())  # beside metrics.jsonl
    assert eight["mesh"]["data"] == 4 and eight["mesh"]["tensor"] == 2
    eight = eight["perplexity"]
    assert one["tokens"] == eight["tokens"] > 0 and one["bytes"] == len(TEXT) + sum(map(len, LINES))
    for key in ("nll", "perplexity", "bits_per_byte"):
        assert abs(one[key] - eight[key]) < 1e-5 * max(1, abs(one[key])), key
    tokens = seen[0]  # the rows split over the 4 data shards, whole on each tensor pair
    assert tokens.sharding.spec[0] is not None and len(tokens.sharding.device_set) == 8
    rows = {s.index[0].start for s in tokens.addressable_shards}
    assert len(rows) == 4 and all(s.data.shape[0] == tokens.shape[0] // 4
                                  for s in tokens.addressable_shards)
    # the same number as the library's perplexity on the same documents
    from jaxlm import load, load_tokenizer
    from jaxlm.infer.evaluate import read_eval_data
    cfg, params = load(ck)
    docs = read_eval_data([str(p) for p in data], load_tokenizer(ck))
    assert abs(score.perplexity(params, cfg, docs.ids, stride=16).nll - one["nll"]) < 1e-6


def test_a_local_task_and_left_truncation(tiny_checkpoint, tmp_path, capsys):
    """A multiple-choice task whose contexts are longer than the model's 32 positions:
    cut from the left as lm-eval cuts them, and counted."""
    rows = [{"q": ("word " * n).strip(), "choices": ["yes", "no"], "a": 0} for n in (3, 40, 50)]
    (tmp_path / "long.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    (tmp_path / "jx_long.yaml").write_text(f"""task: jx_long
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'long.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{a}}}}"
metric_list:
  - metric: acc
""")
    rc, cap = run(capsys, "--checkpoint", tiny_checkpoint("llama"), "--tasks", "jx_long",
                  "--include-path", tmp_path, "--output", tmp_path / "r.json", "mesh.devices=1")
    assert rc == 0, cap.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= result["tasks"]["jx_long"]["acc,none"] <= 1
    assert result["truncated"] == 4  # two long questions x two choices
    assert "4 request(s)" in cap.out and "cut from the left" in cap.err


def test_bad_input_is_one_line(tiny_checkpoint, files, tmp_path, capsys):
    ck = tiny_checkpoint("llama")
    hf = tmp_path / "hf"  # an HF dir without a tokenizer
    from jaxlm import load, save
    cfg, params = load(ck)
    save(str(hf), cfg, params, format="hf")
    cases = [(("--checkpoint", ck, "--data", files / "empty.txt"), "empty"),
             (("--checkpoint", ck, "--data", tmp_path / "missing.txt"), "no such file"),
             (("--checkpoint", hf, "--data", files / "a.txt"), "has no tokenizer"),
             (("--checkpoint", ck), "give --data"),
             (("--checkpoint", ck, "--data", files / "a.txt", "--stride", 99), "--stride 99"),
             (("--checkpoint", ck, "--data", files / "a.txt", "train.steps=3"), "mesh.*")]
    for argv, needle in cases:
        rc, cap = run(capsys, *argv, "--output", tmp_path / "never.json")
        err = [x for x in cap.err.splitlines() if x.strip()]
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv, cap.err)
    assert not (tmp_path / "never.json").exists()
    # an unknown task name (checked against the local tasks only: no index of lm-eval's own)
    from lm_eval.tasks import TaskManager

    from jaxlm.errors import ConfigError
    from jaxlm.infer.evaluate import check_tasks
    (tmp_path / "t").mkdir()
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        check_tasks(TaskManager(include_path=str(tmp_path / "t"), include_defaults=False),
                    ["nope"])


def test_eval_tasks_during_training(sp_tokenizer_file, tmp_path, capsys):
    """train.eval_tasks at eval_every: logged to metrics.jsonl and TensorBoard; the last
    step's numbers are `jaxlm eval --tasks` of the run's final checkpoint."""
    from jaxlm.config import load_config
    from jaxlm.train.loop import train
    (tmp_path / "roll.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                                   [TEXT[:200], *LINES]) + "\n")
    (tmp_path / "jx_roll.yaml").write_text(f"""task: jx_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'roll.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""")
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        "model.vocab_size=512", "model.d_model=32", "model.n_layers=1", "model.n_heads=4",
        "model.n_kv_heads=4", "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32",
        "data.batch_size=4", "data.max_docs=20", "data.shuffle_rows=64",
        "train.steps=2", "train.warmup_steps=0",
        "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
        "train.eval_tasks=[jx_roll]", f"train.eval_task_path={tmp_path}", "mesh.devices=1",
        f"data.tokenizer={sp_tokenizer_file}", f"run_dir={run_dir}"])
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["eval_jx_roll/bits_per_byte"] for r in rows
           if "eval_jx_roll/bits_per_byte" in r}
    assert set(got) == {0, 2} and got[0] != got[2]  # at the start, then every 2 steps
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run_dir))
    events.Reload()
    assert {e.step for e in events.Scalars("eval_jx_roll/bits_per_byte")} == set(got)
    rc, cap = run(capsys, "--checkpoint", run_dir, "--tasks", "jx_roll", "--include-path",
                  tmp_path, "mesh.devices=1")
    assert rc == 0, cap.err
    final = json.loads((run_dir / "eval-step-2.json").read_text())
    assert abs(final["tasks"]["jx_roll"]["bits_per_byte,none"] - got[2]) < 1e-6
