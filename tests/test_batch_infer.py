"""`jaxlm batch-infer`: sharded outputs equal single-device generate; resume after a torn write."""

import json
import os

import jax
import pytest

import jaxlm
from jaxlm.errors import InputError
from jaxlm.infer.batch import batch_infer, read_inputs, recover_output

PROMPTS = ["def main():", "import os", "class Foo(object):", "return None", "for i in range(",
           "# a comment", "while True:", "x = [", "try:", "print('hello')", "with open("]
GEN = ["generate.max_new_tokens=6", "generate.temperature=0"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama")


def write_inputs(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def full_run(checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("bi")
    inp, out = str(d / "in.jsonl"), str(d / "out.jsonl")
    write_inputs(inp, [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    summary = batch_infer(checkpoint, inp, out, batch_size=4, overrides=GEN, progress=False)
    return inp, out, summary


def test_sharded_outputs_equal_single_device_generate(checkpoint, full_run):
    _, out, summary = full_run
    assert summary["prompts"] == len(PROMPTS) and summary["tokens_per_s"] > 0
    cfg, params = jaxlm.load(checkpoint)
    tok = jaxlm.load_tokenizer(checkpoint)
    one = jax.devices()[0]
    ref = jaxlm.generate(jax.device_put(params, one), cfg,
                         [[tok.bos_id] + tok.encode(p) for p in PROMPTS], max_new_tokens=6,
                         eos_id=tok.eos_id).sequences()
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(PROMPTS))]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == ref
    assert all(isinstance(r["completion"], str) for r in rows)


def test_resume_after_torn_write(checkpoint, full_run, tmp_path):
    inp, full_out, _ = full_run
    with open(full_out, "rb") as f:
        full = f.read()
    lines = full.split(b"\n")
    out = str(tmp_path / "out.jsonl")
    with open(out, "wb") as f:  # 5 whole lines, then a crash halfway through the 6th
        f.write(b"\n".join(lines[:5]) + b"\n" + lines[5][:len(lines[5]) // 2])
    summary = batch_infer(checkpoint, inp, out, batch_size=4, overrides=GEN, progress=False)
    assert summary["skipped"] == 5 and summary["prompts"] == len(PROMPTS) - 5
    with open(out, "rb") as f:
        assert f.read() == full
    assert batch_infer(checkpoint, inp, out, overrides=GEN, progress=False)["prompts"] == 0


def test_recover_output_drops_only_a_torn_last_line(tmp_path):
    out = str(tmp_path / "o.jsonl")
    with open(out, "w") as f:
        f.write('{"id": 1}\n{"id": 2}\n{"id": 3')
    assert recover_output(out) == {"1", "2"}
    assert open(out).read() == '{"id": 1}\n{"id": 2}\n'
    with open(out, "w") as f:
        f.write('{"id": 1}\n{"id": \n{"id": 3}\n')
    with pytest.raises(InputError, match="line 2 is corrupt"):
        recover_output(out)


@pytest.mark.parametrize("lines, needle", [
    (['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}'], "line 2: duplicate id 1"),
    (['{"id": 1, "prompt": "a"}', '{"prompt": "b"}'], 'line 2: missing "id"'),
    (['{"id": 1, "prompt": "a"}', '', '{"id": 2, "prompt": '], "line 3: not valid JSON"),
    (['{"id": 1, "prompt": ""}'], 'line 1: "prompt" must be a non-empty string'),
])
def test_bad_input_lines(tmp_path, lines, needle):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=needle):
        read_inputs(str(path))
    assert os.path.exists(path)


def test_cli_one_line_error_and_summary(checkpoint, tmp_path):
    import subprocess
    import sys
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    def run(*a):
        return subprocess.run([sys.executable, "-m", "jaxlm.scripts.cli", "batch-infer",
                               "--checkpoint", checkpoint, "--input", str(inp), "--output",
                               str(tmp_path / "out.jsonl"), *a],
                              capture_output=True, text=True, timeout=300)
    proc = run()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {inp} line 2: duplicate id 1 (first on line 1)")
    inp.write_text('{"id": 1, "prompt": "def f():"}\n')
    proc = run("--batch-size", "2", "generate.max_new_tokens=3", "mesh.data=2", "mesh.tensor=4")
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout
    assert json.loads((tmp_path / "out.jsonl").read_text())["id"] == 1
