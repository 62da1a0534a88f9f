"""Every Python and shell snippet of README.md runs: what users copy works.

The README's fenced blocks tagged `python`, `sh`, `bash` or `shell` run in one
subprocess (this file run as a script), in README order, in a temporary working
directory where the README's example paths exist:

  runs/tiny-llama        a run trained by `jaxlm train --config tiny-llama` (what
                         `make run` makes), shrunk as below; runs/mine-draft: a copy
  path/to/hf_dir         its Hugging Face export (`jaxlm convert --to hf`) with a
                         ChatML chat template; path/to/hf_llama: the same;
                         path/to/hf_llama_cls: it with a 2-label score head
  chats.jsonl, prefs.jsonl, feedback.jsonl (KTO), completions.jsonl (to score),
  labels.jsonl, math.jsonl (GRPO), prompts.txt, prompts.jsonl, tok.model, data/*.parquet,
  valid.txt, tasks/my_mc.jsonl and tasks/my_mc.yaml (the README's yaml block)
                         small inputs of the formats the README describes

Anything else a block uses (runs/mine, runs/lora, ...) an earlier block makes.

- `python` blocks run in one namespace, one after another, as cells of a notebook.
- `sh` blocks are expanded by bash (quotes, line continuations, comments; `set -eu`,
  and no PATH: a block holds only `jaxlm` commands), and each `jaxlm ...` command
  runs through `jaxlm.scripts.cli.main`, the function behind the `jaxlm` script, in
  this one process (one import of jax, shared compiles); each must exit 0.
- `jaxlm train` runs with SHRINK: those keys replace the snippet's own (2 steps of
  8 x 128 tokens on 20 documents; where the model is the preset's, not train.init_from's:
  MODEL's smaller widths and depth (one shape for every preset run: their programs
  compile once) and the shared 512-piece tokenizer; one device unless the
  snippet sets mesh keys), so every preset, key and flag of the snippet is checked
  without a real training run.
- A block the machine cannot run (`make`, several hosts, a TPU pod, a benchmark)
  carries `<!-- skip-test: why -->` on the line before its fence. A fence without a
  language fails `test_every_block_is_tagged`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
RUN = ("python", "sh", "bash", "shell")
SKIP = re.compile(r"<!--\s*skip-test:\s*(.*?)\s*-->")

# `jaxlm train` in the test: these replace the snippet's values of the same keys; MODEL
# too where the model comes from the preset, not from train.init_from
SHRINK = {"train.steps": "2", "train.warmup_steps": "0", "train.eval_every": "2",
          "train.eval_batches": "1", "train.checkpoint_every": "2", "train.log_every": "1",
          "data.batch_size": "8", "data.seq_len": "128", "data.max_docs": "20",
          "data.shuffle_rows": "64"}
MODEL = {"model.vocab_size": "512", "model.d_model": "64", "model.n_heads": "4",
         "model.n_kv_heads": "2", "model.d_ff": "128", "model.n_layers": "2"}


def readme_blocks(text: str | None = None) -> list[dict]:
    """The fenced blocks: {line (of the fence), lang, code, skip (the reason or None)}."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.search(before)
        blocks.append({"line": i + 1, "lang": m.group(1), "code": "\n".join(lines[i + 1:end]) + "\n",
                       "skip": skip.group(1) if skip else None})
        i = end + 1
    return blocks


def block_id(block) -> str:
    return f"README.md:{block['line']}-{block['lang']}"


BLOCKS = readme_blocks()
RUNNABLE = [b for b in BLOCKS if b["lang"] in RUN and not b["skip"]]


# ---------------------------------------------------------------- the tests

def test_every_block_is_tagged_and_every_skip_says_why():
    untagged = [b["line"] for b in BLOCKS if not b["lang"]]
    assert not untagged, f"README.md fences without a language at lines {untagged}"
    assert all(b["skip"].strip() for b in BLOCKS if b["skip"] is not None)
    assert len(RUNNABLE) >= 6  # the notebook cells and the command lines


def test_the_jaxlm_script_is_cli_main():
    """The shell snippets run `jaxlm.scripts.cli.main` in-process: the `jaxlm` script's."""
    from importlib.metadata import entry_points
    (script,) = entry_points(group="console_scripts", name="jaxlm")
    assert script.value == "jaxlm.scripts.cli:main"


def test_block_parsing():
    text = ("a\n```python\nx = 1\n```\n<!-- skip-test: needs a pod -->\n\n```sh\njaxlm x\n```\n"
            "```\nplain\n```\n")
    assert readme_blocks(text) == [
        {"line": 2, "lang": "python", "code": "x = 1\n", "skip": None},
        {"line": 7, "lang": "sh", "code": "jaxlm x\n", "skip": "needs a pod"},
        {"line": 10, "lang": "", "code": "plain\n", "skip": None}]
    assert shell_commands("jaxlm a 'b c' \\\n  d=\"e f\"  # comment\n# only a comment\n"
                          "jaxlm g --x 'line one\nline two'\n") == [
        ["a", "b c", "d=e f"], ["g", "--x", "line one\nline two"]]
    argv = shrink(["train", "--config", "tiny-llama", "train.steps=2000", "model.n_layers=6",
                   "--resume"], "tok.model")
    assert argv[:4] == ["train", "--config", "tiny-llama", "--resume"]
    assert argv[4] == "train.steps=2" and argv[-2:] == ["data.tokenizer=tok.model",
                                                       "mesh.devices=1"]
    assert "model.n_layers=2" in argv and "model.n_layers=6" not in argv  # MODEL's depth
    assert "model.d_model=64" in argv and "mesh.devices=1" in argv
    argv = shrink(["train", "--config", "tiny-mixtral", "mesh.data=2"], "tok.model")
    assert "model.d_model=64" in argv and "mesh.devices=1" not in argv
    argv = shrink(["train", "--config", "sft", "train.init_from=runs/x"], "tok.model")
    assert "train.init_from=runs/x" in argv and not any(
        a.startswith(("model.", "data.tokenizer")) for a in argv)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, sp_tokenizer_file):
    """The runner (`main` below) over every runnable block: ({block id: result}, its
    process). It inherits conftest's environment (8 CPU devices, the session's
    compilation cache)."""
    work = tmp_path_factory.mktemp("readme")
    proc = subprocess.run([sys.executable, __file__, str(work), sp_tokenizer_file],
                          capture_output=True, text=True, timeout=900, cwd=work)
    results = work / "results.json"
    if not results.exists():
        raise AssertionError(f"the README runner failed:\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return json.loads(results.read_text()), proc


@pytest.mark.parametrize("block", RUNNABLE, ids=block_id)
def test_readme_block_runs(block, readme_run):
    results, proc = readme_run
    result = results.get(block_id(block))
    assert result is not None, f"{block_id(block)} did not run (an earlier block stopped " \
                               f"the runner?)\n{proc.stderr[-3000:]}"
    assert result["ok"], f"{block_id(block)} failed:\n{result['error']}"


# ---------------------------------------------------------------- the runner

def shell_commands(code: str) -> list[list[str]]:
    """The argv of each `jaxlm` command of a shell block, as bash expands them."""
    record = 'jaxlm() { printf "%s\\0" "$@" $\'\\x1f\'; }\nset -eu\n'
    proc = subprocess.run([shutil.which("bash"), "-c", record + code], capture_output=True,
                          env={"PATH": "/nonexistent"}, timeout=60)
    if proc.returncode:
        raise RuntimeError(f"bash: {proc.stderr.decode().strip()} (a block holds `jaxlm` "
                           "commands only; mark others <!-- skip-test: why -->)")
    commands, current = [], []
    for arg in proc.stdout.decode().split("\0")[:-1]:
        if arg == "\x1f":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    return commands


def shrink(argv: list[str], tokenizer: str) -> list[str]:
    """`jaxlm train` argv with SHRINK (and MODEL, and the shared tokenizer, for a model
    of the preset's) in place of the snippet's values of those keys."""
    if argv[:1] != ["train"]:
        return argv
    from jaxlm.config import apply_overrides, canonical_key, parse_override, read_yaml
    is_override = [i > 0 and "=" in a and not a.startswith("-") and argv[i - 1] != "--config"
                   for i, a in enumerate(argv)]
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    given = [parse_override(a) for a, o in zip(argv, is_override) if o]
    data = apply_overrides(read_yaml(config) if config else {}, given)
    replace = dict(SHRINK)
    if not (data.get("train") or {}).get("init_from"):  # a model of the preset's
        replace.update(MODEL, **{"data.tokenizer": tokenizer})
    if not data.get("mesh"):  # one device, unless the snippet is about the mesh
        replace["mesh.devices"] = "1"
    out = [a for a, o in zip(argv, is_override)
           if not o or canonical_key(a.split("=", 1)[0]) not in replace]
    # after the snippet's own overrides: argparse takes the positionals in one run
    at = max((i + 1 for i, a in enumerate(out) if "=" in a and not a.startswith("-")
              and out[i - 1] != "--config"), default=len(out))
    return out[:at] + [f"{k}={v}" for k, v in replace.items()] + out[at:]


def run_cli(argv: list[str], tokenizer: str) -> None:
    from jaxlm.scripts.cli import main
    argv = shrink(argv, tokenizer)
    print("$ jaxlm " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    rc = main(argv)
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if rc:
        raise RuntimeError(f"`jaxlm {' '.join(argv)}` exited {rc}")


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def make_inputs(work: Path, tokenizer: str) -> None:
    """The README's example paths (see the module docstring)."""
    run_cli(["train", "--config", "tiny-llama", "run_dir=runs/tiny-llama"], tokenizer)
    shutil.copytree(work / "runs/tiny-llama", work / "runs/mine-draft")
    run_cli(["convert", "--input", "runs/tiny-llama", "--output", "path/to/hf_dir", "--to", "hf"],
            tokenizer)
    config = json.loads((work / "path/to/hf_dir/tokenizer_config.json").read_text()) \
        if (work / "path/to/hf_dir/tokenizer_config.json").exists() else {}
    config["chat_template"] = CHAT_TEMPLATE
    (work / "path/to/hf_dir/tokenizer_config.json").write_text(json.dumps(config))
    shutil.copytree(work / "path/to/hf_dir", work / "path/to/hf_llama")
    import transformers  # the export with a fresh 2-label score head, as a classifier dir
    cls = work / "path/to/hf_llama_cls"
    transformers.AutoModelForSequenceClassification.from_pretrained(
        work / "path/to/hf_dir", num_labels=2).save_pretrained(cls)
    for f in (work / "path/to/hf_dir").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, cls / f.name)
    shutil.copy(tokenizer, work / "tok.model")
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (work / "chats.jsonl").write_text(lines(
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"{2 * i}."}]} for i in range(60)))
    (work / "prefs.jsonl").write_text(lines(
        {"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."}
        for i in range(60)))
    (work / "feedback.jsonl").write_text(lines(
        {"prompt": f"What is {i} + 1?", "completion": f"{i + 1 + i % 2}.", "label": i % 2 == 0}
        for i in range(60)))
    (work / "completions.jsonl").write_text(lines(
        {"prompt": "What is 2 + 1?", "completion": c} for c in ("3.", "4.")))
    (work / "labels.jsonl").write_text(lines(
        {"text": f"{i} is {'even' if i % 2 == 0 else 'odd'}", "label": i % 2} for i in range(60)))
    (work / "math.jsonl").write_text(lines(
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": f"{2 * i}."}
        for i in range(20)))
    (work / "prompts.txt").write_text("import os\ndef main():\n")
    (work / "valid.txt").write_text("def add(a, b):\n    return a + b\n" * 12)
    (work / "tasks").mkdir()
    (work / "tasks/my_mc.jsonl").write_text(lines(
        {"question": f"What is {i} + 1?", "choices": [str(i + 1), str(i + 2)], "answer": 0}
        for i in range(8)))
    (work / "tasks/my_mc.yaml").write_text(next(  # the README's own task file
        b["code"] for b in BLOCKS if b["lang"] == "yaml" and "task: my_mc" in b["code"]))
    (work / "prompts.jsonl").write_text(lines(
        {"id": i, "prompt": p} for i, p in enumerate(["import os", "def main():", "class A:"])))
    import pyarrow as pa
    import pyarrow.parquet as pq
    (work / "data/web").mkdir(parents=True)
    texts = ["def add(a, b):\n    return a + b\n" * (i + 1) for i in range(40)]
    pq.write_table(pa.table({"text": texts}), work / "data/web/part-0.parquet")


def main(work: str, tokenizer: str) -> None:
    os.chdir(work)
    results, namespace = {}, {"__name__": "__readme__"}
    make_inputs(Path(work), tokenizer)
    for block in RUNNABLE:
        name, t0 = block_id(block), time.perf_counter()
        print(f"=== {name}", flush=True)
        try:
            if block["lang"] == "python":
                exec(compile(block["code"], name, "exec"), namespace)
            else:
                for argv in shell_commands(block["code"]):
                    run_cli(argv, tokenizer)
            results[name] = {"ok": True}
        except BaseException as e:  # noqa: BLE001 - reported per block
            import traceback
            results[name] = {"ok": False, "error": "".join(traceback.format_exception(e))[-4000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"=== {name}: {results[name]}", flush=True)
        Path(work, "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
