"""The `jaxlm` command: bad input gets one `error:` line and exit 2, no traceback."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxlm


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "jaxlm.scripts.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


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
def test_bad_input_is_one_line(args, needle, tmp_path):
    assert_one_line_error(run_cli(*args, f"run_dir={tmp_path}/run") if args[0] == "train"
                          else run_cli(*args), needle)


def test_generate_errors(small_checkpoint, tmp_path):
    assert_one_line_error(run_cli("generate", "--checkpoint", small_checkpoint, "--prompt", ""),
                          "prompt 0 is empty")
    assert_one_line_error(run_cli("generate", "--checkpoint", small_checkpoint),
                          "no prompt given")
    long_prompt = "def f(x):\n    return x\n" * 20
    assert_one_line_error(run_cli("generate", "--checkpoint", small_checkpoint,
                                  "--prompt", long_prompt), "32")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model: [not, a, mapping\n")
    assert_one_line_error(run_cli("generate", "--checkpoint", str(broken), "--prompt", "x"),
                          "corrupt")


def test_generate_prints_text(small_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\ndef main():\n")
    proc = run_cli("generate", "--checkpoint", small_checkpoint, "--prompts-file", str(prompts),
                   "--prompt", "class A:", "generate.max_new_tokens=5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("=== prompt:") == 3
    for p in ("import os", "def main():", "class A:"):
        assert f"=== prompt: {p!r}" in proc.stdout


def test_generate_beams_and_speculative(small_checkpoint):
    proc = run_cli("generate", "--checkpoint", small_checkpoint, "--prompt", "import os",
                   "generate.max_new_tokens=4", "generate.temperature=0", "generate.num_beams=3",
                   "generate.num_return_sequences=2", "generate.repetition_penalty=1.2")
    assert proc.returncode == 0, proc.stderr
    assert "=== prompt: 'import os' #2 (score" in proc.stdout
    proc = run_cli("generate", "--checkpoint", small_checkpoint, "--prompt", "import os",
                   "--draft", small_checkpoint, "--num-speculative", "3",
                   "generate.max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr
    assert "draft tokens accepted" in proc.stdout and "=== prompt: 'import os'" in proc.stdout
    assert_one_line_error(run_cli("generate", "--checkpoint", small_checkpoint, "--prompt", "x",
                                  "--draft", small_checkpoint, "generate.min_p=0.1"),
                          "generate.min_p is not supported with speculative decoding")


def test_convert_round_trip_and_generate_from_hf(small_checkpoint, tmp_path):
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    proc = run_cli("convert", "--input", small_checkpoint, "--output", hf_dir, "--to", "hf")
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors"))
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.model"))
    proc = run_cli("convert", "--input", hf_dir, "--output", back, "--to", "jaxlm")
    assert proc.returncode == 0, proc.stderr
    _, original = jaxlm.load(small_checkpoint)
    _, restored = jaxlm.load(back)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), original, restored)
    proc = run_cli("generate", "--checkpoint", hf_dir, "--prompt", "import os",
                   "generate.max_new_tokens=4")
    assert proc.returncode == 0 and "=== prompt: 'import os'" in proc.stdout, proc.stderr
    assert_one_line_error(run_cli("convert", "--input", hf_dir, "--output", back, "--to", "hf"),
                          "not empty")
