"""The `jaxlm` command: bad input gets one `error:` line and exit 2, no traceback.

`--help` and the bad-input cases run the real script in a subprocess; the commands on a
checkpoint run `jaxlm.scripts.cli.main` (the function behind the script) in this process,
where the checkpoint's programs compile once for every test."""

import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import jaxlm


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "jaxlm.scripts.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli(capsys):
    """cli(*args) -> .returncode, .stdout, .stderr of `jaxlm *args` run in this process."""
    from jaxlm.scripts.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse
            rc = e.code
        out = capsys.readouterr()
        return types.SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)

    return run


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_checkpoint(tiny_checkpoint):
    """A random tiny model with a 32-token context and a real tokenizer."""
    return tiny_checkpoint("llama")


def test_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "generate" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["train", "--config", "tiny-llama", "model.d_modle=3"],
     "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
    (["train", "--config", "no-such-preset"], "config 'no-such-preset' not found"),
    (["train", "--config", "tiny-llama", "mesh.data=3"], "needs a multiple of 3 devices"),
    (["train", "--config", "tiny-llama", "data.corpus=/no/such/corpus"], "/no/such/corpus"),
    (["generate", "--checkpoint", "/no/such/dir", "--prompt", "x"], "/no/such/dir"),
])
def test_bad_input_is_one_line(cli, args, needle, tmp_path):
    run_dir = tmp_path / "run"
    assert_one_line_error(cli(*args, f"run_dir={run_dir}") if args[0] == "train" else cli(*args),
                          needle)
    assert not run_dir.exists()  # a refused command writes nothing


def test_the_script_itself_gives_one_line_and_exit_2():
    assert_one_line_error(run_cli("generate", "--checkpoint", "/no/such/dir", "--prompt", "x"),
                          "/no/such/dir")


def test_generate_errors(cli, small_checkpoint, tmp_path):
    assert_one_line_error(cli("generate", "--checkpoint", small_checkpoint, "--prompt", ""),
                          "prompt 0 is empty")
    assert_one_line_error(cli("generate", "--checkpoint", small_checkpoint),
                          "no prompt given")
    long_prompt = "def f(x):\n    return x\n" * 20
    assert_one_line_error(cli("generate", "--checkpoint", small_checkpoint,
                                  "--prompt", long_prompt), "32")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model: [not, a, mapping\n")
    assert_one_line_error(cli("generate", "--checkpoint", str(broken), "--prompt", "x"),
                          "corrupt")


def test_generate_prints_text(cli, small_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\ndef main():\n")
    proc = cli("generate", "--checkpoint", small_checkpoint, "--prompts-file", str(prompts),
                   "--prompt", "class A:", "generate.max_new_tokens=5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("=== prompt:") == 3
    for p in ("import os", "def main():", "class A:"):
        assert f"=== prompt: {p!r}" in proc.stdout


def test_generate_beams_and_speculative(cli, small_checkpoint):
    proc = cli("generate", "--checkpoint", small_checkpoint, "--prompt", "import os",
                   "generate.max_new_tokens=4", "generate.temperature=0", "generate.num_beams=3",
                   "generate.num_return_sequences=2", "generate.repetition_penalty=1.2")
    assert proc.returncode == 0, proc.stderr
    assert "=== prompt: 'import os' #2 (score" in proc.stdout
    proc = cli("generate", "--checkpoint", small_checkpoint, "--prompt", "import os",
                   "--draft", small_checkpoint, "--num-speculative", "3",
                   "generate.max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr
    assert "draft tokens accepted" in proc.stdout and "=== prompt: 'import os'" in proc.stdout
    assert_one_line_error(cli("generate", "--checkpoint", small_checkpoint, "--prompt", "x",
                                  "--draft", small_checkpoint, "generate.min_p=0.1"),
                          "generate.min_p is not supported with speculative decoding")


def test_convert_round_trip_and_generate_from_hf(cli, small_checkpoint, tmp_path):
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    proc = cli("convert", "--input", small_checkpoint, "--output", hf_dir, "--to", "hf")
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors"))
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.model"))
    proc = cli("convert", "--input", hf_dir, "--output", back, "--to", "jaxlm")
    assert proc.returncode == 0, proc.stderr
    _, original = jaxlm.load(small_checkpoint)
    _, restored = jaxlm.load(back)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), original, restored)
    proc = cli("generate", "--checkpoint", hf_dir, "--prompt", "import os",
                   "generate.max_new_tokens=4")
    assert proc.returncode == 0 and "=== prompt: 'import os'" in proc.stdout, proc.stderr
    assert_one_line_error(cli("convert", "--input", hf_dir, "--output", back, "--to", "hf"),
                          "not empty")


def test_config_lists_every_key_with_its_meaning(capsys):
    from jaxlm.config import describe_keys
    from jaxlm.scripts.cli import main
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "meaning"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip() and line[0] != " "}
    assert list(rows) == [d.key for d in describe_keys()]
    assert rows["train.lora.rank"].split()[1:3] == ["int", "0"]
    assert "LoRA off" in rows["train.lora.rank"]
    assert rows["data.tokenizer"].split()[2] == "''"  # values as YAML writes them

    assert main(["config", "--config", "tiny-llama", "train.lora", "model.d_model",
                 "train.steps=70"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["key", "type", "value"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line[:1].strip()}
    assert rows["model.d_model"][:3] == ["model.d_model", "int", "192"]
    assert set(rows) == {"model.d_model", "train.lora.rank", "train.lora.alpha",
                         "train.lora.targets", "train.lora.base_dtype", "train.lora.init_from"}

    import json
    assert main(["config", "--json", "--config", "tiny-llama", "model.rope.theta",
                 "data.sources"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"key": "model.rope.theta", "type": "float", "default": 10000.0, "value": 10000.0,
         "meaning": "base of the rotary frequencies"},
        {"key": "data.sources", "type": "list", "default": [], "value": [],
         "meaning": describe_keys()[[d.key for d in describe_keys()].index(
             "data.sources")].meaning}]


@pytest.mark.parametrize("args, needle", [
    (["config", "trian"], "unknown config section or key 'trian' (did you mean 'train'?)"),
    (["config", "--config", "no-such-preset"], "config 'no-such-preset' not found"),
    (["config", "train.steps=1", "train.steps=2"], "train.steps is given twice"),
])
def test_config_errors_are_one_line(args, needle, capsys):
    from jaxlm.scripts.cli import main
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_config_wraps_meanings_to_a_terminal():
    from jaxlm.config import describe_keys, select_keys
    from jaxlm.scripts.config_keys import format_keys
    docs = select_keys(describe_keys(), ["train.lora", "mesh.rules"])
    lines = format_keys(docs, width=90)
    assert max(len(line) for line in lines if not line.startswith("mesh.rules")) <= 90
    col = lines[0].index("meaning")
    targets = lines.index(next(line for line in lines if line.startswith("train.lora.targets")))
    assert lines[targets + 1].startswith(" " * col + "regex")  # a value too long: next line
    narrow = format_keys(docs, width=40)
    assert any(line.startswith("    the adapters' rank") for line in narrow)
