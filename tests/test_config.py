"""Config loading: presets, overrides, and one clear line for every mistake."""

import pytest

from jaxlm.errors import ConfigError
from jaxlm.config import Config, config_from_dict, load_config, parse_override, to_dict
from jaxlm.model.config import ModelConfig


PARAMS_B = {"llama3-8b": 8.03, "mistral-7b": 7.24, "qwen2-0.5b": 0.494, "mixtral-8x7b": 46.70,
            "gpt2": 0.1244, "qwen3-8b": 8.191, "qwen3-30b-a3b": 30.53, "gemma2-9b": 9.242,
            "gemma3-4b": 3.880, "phi3-mini": 3.821}


def test_presets_load_and_round_trip():
    import importlib.resources
    names = sorted(p.name[:-5] for p in importlib.resources.files("jaxlm.configs").iterdir()
                   if p.name.endswith(".yaml"))
    assert {"tiny-llama", "bench-cpu", *PARAMS_B} <= set(names)
    for name in names:  # fine-tuning presets start from a run that may not exist yet
        cfg = load_config(name, ["train.init_from="])
        assert isinstance(cfg, Config)
        assert config_from_dict(to_dict(cfg)) == cfg
        hash(cfg.model)  # static jit argument


@pytest.mark.parametrize("name", sorted(PARAMS_B))
def test_published_shapes_have_their_parameter_counts(name):
    from jaxlm.model import model_specs
    from jaxlm.model.params import count
    billions = count(model_specs(load_config(name).model)) / 1e9
    assert abs(billions - PARAMS_B[name]) / PARAMS_B[name] < 0.002, billions


def test_bench_preset_is_the_issue_shape():
    m = load_config("bench-cpu").model
    d = load_config("bench-cpu").data
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size, m.dtype) == (
        256, 4, 4, 1024, 32000, "float32")
    assert (d.seq_len, d.batch_size) == (256, 4)


def test_overrides_are_typed():
    cfg = load_config("tiny-llama", ["train.steps=7", "train.warmup_steps=2", "train.learning_rate=1e-3",
                                     "model.tie_embeddings=true", "run_dir=/tmp/x"])
    assert cfg.train.steps == 7 and cfg.train.learning_rate == 1e-3
    assert cfg.model.tie_embeddings is True and cfg.run_dir == "/tmp/x"
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_defaults_fill_heads_and_head_dim():
    m = ModelConfig(d_model=96, n_heads=6)
    assert m.n_kv_heads == 6 and m.head_dim == 16 and m.q_per_kv == 1
    assert ModelConfig(d_model=96, n_heads=6, n_kv_heads=1).q_per_kv == 6


@pytest.mark.parametrize("overrides, needle", [
    (["model.d_modle=128"], "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
    (["trian.steps=3"], "unknown config key 'trian.steps' (did you mean 'train.steps'?)"),
    (["model.n_heads=5"], "model.n_heads=5 does not divide model.d_model=192"),
    (["model.n_kv_heads=4"], "model.n_kv_heads=4 does not divide model.n_heads=6"),
    (["data.seq_len=1024"], "data.seq_len=1024 is longer than model.max_seq_len=512"),
    (["model.d_model=-4"], "model.d_model=-4 must be > 0"),
    (["model.remat=ful"], "model.remat='ful' is not one of none, full, dots, dots_no_batch "
                          "(did you mean 'full'?)"),
    (["train.steps=abc"], "train.steps='abc' should be of type int"),
    (["train.warmup_steps=5000"], "train.warmup_steps=5000 must be in [0, train.steps=1000]"),
    (["mesh.data=0"], "mesh.data=0 must be a positive size or -1"),
    (["mesh.fsdp=-1"], "mesh: at most one axis may be -1"),
    (["model.n_layers"], "should look like key=value"),
])
def test_errors_are_one_clear_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-llama", overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"tiny-lama.*not found.*did you mean 'tiny-llama'"):
        load_config("tiny-lama")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: {d_model: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(p))


def test_llama_1b_preset_counts_its_parameters():
    """The GPU benchmark preset: ~1.07B, recounted by hand from the Llama layout."""
    from jaxlm.model import model_specs
    from jaxlm.model.params import count
    cfg = load_config("llama-1b")
    m = cfg.model
    hd = m.d_model // m.n_heads
    layer = (m.d_model * hd * (2 * m.n_heads + 2 * m.n_kv_heads)  # q, o; k, v
             + 3 * m.d_model * m.d_ff + 2 * m.d_model)  # gate, up, down; two norms
    want = 2 * m.vocab_size * m.d_model + m.n_layers * layer + m.d_model  # embed, head, final norm
    assert count(model_specs(m)) == want
    assert 1.0e9 < want < 1.1e9 and hd == 128
    assert (m.dtype, m.param_dtype, cfg.data.seq_len) == ("bfloat16", "float32", 2048)


# ------------------------------------------------------------------ nested sections, old keys

# A config.yaml as runs saved it before the nested sections: every old flat key, none
# at its default.
OLD_LAYOUT = """
model:
  vocab_size: 256
  d_model: 32
  n_layers: 2
  n_heads: 4
  d_ff: 64
  max_seq_len: 64
  rope_theta: 500000.0
  rope_scaling: yarn
  rope_scaling_factor: 4.0
  rope_low_freq_factor: 2.0
  rope_high_freq_factor: 8.0
  rope_original_max_len: 32
  rope_yarn_beta_fast: 16.0
  rope_yarn_beta_slow: 2.0
  rope_yarn_mscale: 1.0
  rope_yarn_mscale_all_dim: 0.5
  rope_yarn_truncate: false
  rope_attention_factor: 1.5
  n_experts: 4
  experts_per_token: 1
  moe_capacity_factor: 1.25
  router_aux_loss_coef: 0.01
  router_z_loss_coef: 0.002
data:
  seq_len: 32
train:
  lora_rank: 8
  lora_alpha: 16.0
  lora_targets: layers/attn/(q|v)
  lora_base_dtype: int8
  dpo_beta: 0.2
  dpo_loss: simpo
  dpo_label_smoothing: 0.1
  simpo_gamma: 0.3
  cpo_alpha: 0.2
  kto_beta: 0.2
  desirable_weight: 2.0
  undesirable_weight: 0.5
  center_rewards_coefficient: 0.01
run_dir: runs/old
"""


def _nested_form():
    from jaxlm.config import (DataConfig, DpoConfig, KtoConfig, LoraConfig, RewardConfig,
                              TrainConfig)
    from jaxlm.model.config import MoeConfig, RopeConfig, YarnConfig
    return Config(
        model=ModelConfig(
            vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64,
            rope=RopeConfig(theta=500000.0, scaling="yarn", factor=4.0, low_freq_factor=2.0,
                            high_freq_factor=8.0, original_max_len=32, attention_factor=1.5,
                            yarn=YarnConfig(beta_fast=16.0, beta_slow=2.0, mscale=1.0,
                                            mscale_all_dim=0.5, truncate=False)),
            moe=MoeConfig(n_experts=4, experts_per_token=1, capacity_factor=1.25,
                          aux_loss_coef=0.01, z_loss_coef=0.002)),
        data=DataConfig(seq_len=32),
        train=TrainConfig(lora=LoraConfig(rank=8, alpha=16.0, targets="layers/attn/(q|v)",
                                          base_dtype="int8"),
                          dpo=DpoConfig(beta=0.2, loss="simpo", label_smoothing=0.1,
                                        simpo_gamma=0.3, cpo_alpha=0.2),
                          kto=KtoConfig(beta=0.2, desirable_weight=2.0, undesirable_weight=0.5),
                          reward=RewardConfig(center_rewards_coefficient=0.01)),
        run_dir="runs/old")


def test_an_old_flat_config_yaml_loads_as_the_nested_form(tmp_path):
    import yaml
    from jaxlm.config import ALIASES, flatten
    from jaxlm.train.loop import read_run_config
    old = yaml.safe_load(OLD_LAYOUT)
    # train.lora_from (a short name, not an old one) names a peft dir that load_config
    # reads: test_finetune's test_a_lora_run_pins_its_base loads one through it; TRL's
    # spellings (train.lmbda, train.num_generations, train.kl_coef, ...) are short names
    # too: they load as train.distill.* / train.grpo.* / train.ppo.* (tests/test_distill.py,
    # tests/test_grpo.py, tests/test_ppo.py)
    aliases = {k for k in ALIASES if k not in ("train.lora_from", "train.lmbda",
                                               "train.teacher_model_name_or_path")
               and not ALIASES[k].startswith(("train.grpo.", "train.ppo."))}
    assert aliases <= set(flatten(old)), "the fixture holds every old key"
    defaults = flatten(to_dict(Config()))
    assert all(flatten(old)[k] != defaults[ALIASES[k]] for k in aliases), "none at its default"
    want = _nested_form()
    (tmp_path / "config.yaml").write_text(OLD_LAYOUT)
    assert read_run_config(str(tmp_path)) == want  # a run dir saved before the split
    assert load_config(str(tmp_path / "config.yaml")) == want  # a YAML file
    assert config_from_dict(old) == want
    written = flatten(to_dict(want))  # written back: the nested form only
    assert not aliases & set(written) and {ALIASES[k] for k in aliases} <= set(written)
    assert config_from_dict(to_dict(want)) == want


def test_old_and_new_names_in_overrides_and_model_sections():
    from jaxlm.config import model_config_from_dict
    assert load_config("tiny-llama", ["train.lora_rank=8"]) == \
        load_config("tiny-llama", ["train.lora.rank=8"])
    assert load_config("tiny-llama", ["model.rope_yarn_beta_fast=16", "model.rope_scaling=yarn"]) \
        == load_config("tiny-llama", ["model.rope.yarn.beta_fast=16", "model.rope.scaling=yarn"])
    # an override wins over the file, whichever name either uses
    assert load_config("llama3-8b", ["model.rope_theta=1e6"]).model.rope.theta == 1e6
    assert model_config_from_dict({"n_experts": 4, "rope_theta": 5.0}) == \
        model_config_from_dict({"moe": {"n_experts": 4}, "rope": {"theta": 5.0}})


@pytest.mark.parametrize("overrides, needle", [
    (["train.lora_rank=8", "train.lora.rank=4"],
     "train.lora_rank=8 and train.lora.rank=4 are the old and the new name of one key"),
    (["model={rope_theta: 7, rope: {theta: 8}}"],
     "model.rope_theta=7 and model.rope.theta=8 are the old and the new name of one key"),
    (["model.rope.thta=1"],
     "unknown config key 'model.rope.thta' (did you mean 'model.rope.theta'?)"),
    (["model.rope.yarn.beta_fsat=1"],
     "unknown config key 'model.rope.yarn.beta_fsat' (did you mean 'model.rope.yarn.beta_fast'?)"),
    (["model.moe.n_experts=4", "model.moe.experts_per_token=5"],
     "model.moe.experts_per_token=5 must be in [1, model.moe.n_experts=4]"),
    (["model.n_experts=4", "model.experts_per_token=5"],
     "model.moe.experts_per_token=5 must be in [1, model.moe.n_experts=4]"),
    (["model.rope.scaling=yarn", "model.rope.yarn.beta_fast=0.5"],
     "model.rope.yarn.beta_fast=0.5 must be >= model.rope.yarn.beta_slow=1.0 > 0"),
    (["train.lora.rank=-1"], "train.lora.rank=-1 must be >= 0 (0: LoRA off)"),
    (["train.dpo.loss=hinge"], "train.dpo.loss='hinge' is not one of sigmoid, ipo"),
    (["model.rope=5"], "model.rope should be a mapping, got 5"),
])
def test_nested_errors_are_one_clear_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-llama", overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_a_file_giving_old_and_new_names_of_one_key_is_an_error(tmp_path):
    p = tmp_path / "both.yaml"
    p.write_text("model:\n  rope_theta: 1000.0\n  rope:\n    theta: 2000.0\n")
    with pytest.raises(ConfigError, match=r"model\.rope_theta=1000\.0 and model\.rope\.theta="
                                          r"2000\.0 are the old and the new name of one key"):
        load_config(str(p))
    p.write_text("model:\n  rope_theta: 1000.0\n  rope:\n    theta: 1000.0\n")  # agreeing: fine
    assert load_config(str(p)).model.rope.theta == 1000.0


def test_init_from_takes_old_model_key_names(tmp_path):
    """resolve_init_from's explicit model keys go through the aliases too."""
    import yaml
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config("tiny-llama"))))
    cfg = load_config("tiny-llama", [f"train.init_from={run}", "model.rope_theta=20000"])
    assert cfg.model.rope.theta == 20000.0
    with pytest.raises(ConfigError, match=r"model\.moe\.n_experts=4 would change a parameter "
                                          r"shape .* \(it has moe\.n_experts=0\)"):
        load_config("tiny-llama", [f"train.init_from={run}", "model.n_experts=4"])


# Keys that sit in a nested section without ever having had a flat name (none yet).
# keys that were born nested, with no flat name of their own (nor a TRL spelling)
NEVER_FLAT = {"train.distill.loss", "train.distill.beta", "train.distill.temperature",
              "train.distill.alpha", "model.moe.normalize_top_k", "model.rope.local_theta",
              "model.rope.long_factor", "model.rope.short_factor", "model.moe.router",
              "model.moe.n_groups", "model.moe.topk_groups", "model.moe.routed_scale",
              "model.moe.n_shared", "model.moe.first_dense", "model.moe.dense_d_ff",
              *(f"model.mla.{k}" for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                           "qk_rope_head_dim", "v_head_dim", "rope_interleave"))}


def test_every_nested_key_has_its_old_flat_name_in_the_alias_table():
    """A key moved into a section without an entry in ALIASES fails here: every leaf
    below a nested section (model.rope.*, train.lora.*, ...) is the target of one alias,
    each alias's old name is no current key, and its target is one."""
    from jaxlm.config import ALIASES, _all_keys
    keys = set(_all_keys(Config))
    nested = {k for k in keys if k.count(".") >= 2}
    assert {"model.rope.theta", "model.rope.yarn.beta_fast", "train.lora.rank"} <= nested
    targets = list(ALIASES.values())
    assert len(targets) == len(set(targets)), "one old name per key"
    missing = nested - set(targets) - NEVER_FLAT
    assert not missing, f"nested keys without their old flat name in ALIASES: {sorted(missing)}"
    for old, new in ALIASES.items():
        assert new in keys, f"ALIASES[{old!r}] = {new!r} is no config key"
        assert old not in keys and old.count(".") == 1, old
        assert old.split(".")[0] == new.split(".")[0], (old, new)  # same top-level section


def test_a_key_typed_twice_on_the_command_line_is_refused(tmp_path, capsys):
    """`jaxlm train ... train.steps=3 train.steps=2` kept the last one silently: refused
    in one line, exit 2, nothing written. (A library caller's override list may
    compose a base and its changes: there the later one wins.)"""
    from jaxlm.config import refuse_repeated_keys
    from jaxlm.scripts.cli import main
    run = tmp_path / "run"
    for args, needle in [(["train.steps=3", "train.steps=2"],
                          "train.steps is given twice (train.steps=3, then train.steps=2): "
                          "give it once"),
                         (["train.steps=3", "train.steps=3"], "train.steps is given twice"),
                         (["train.lora_rank=8", "train.lora.rank=4"],
                          "train.lora_rank=8 and train.lora.rank=4 are the old and the new name")]:
        assert main(["train", "--config", "tiny-llama", f"run_dir={run}", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: " + err[len("error: "):] and needle in err and "\n" not in err
        with pytest.raises(ConfigError):
            refuse_repeated_keys(args)
    assert not run.exists()
    assert load_config("tiny-llama", ["train.steps=300", "train.steps=200"]).train.steps == 200


def test_submodules_and_generate_parameters_from_a_plain_import():
    """After `import jaxlm` alone (a fresh interpreter, nothing else imported, jax not
    loaded): jaxlm.model.chat.chat_template_of is reachable, and help(jaxlm.generate)
    lists its real keyword parameters, not **kwargs."""
    import subprocess
    import sys
    code = ("import sys, inspect, jaxlm\n"
            "assert 'jax' not in sys.modules\n"
            "assert callable(jaxlm.model.chat.chat_template_of)\n"
            "assert callable(jaxlm.infer.batch.batch_infer)\n"
            "sig = inspect.signature(jaxlm.generate)\n"
            "kinds = {p.kind for p in sig.parameters.values()}\n"
            "assert inspect.Parameter.VAR_KEYWORD not in kinds, sig\n"
            "assert {'max_new_tokens', 'temperature', 'num_beams', 'stream', 'tokenizer',\n"
            "        'stop'} <= set(sig.parameters), sig\n"
            "assert 'repetition_penalty' in jaxlm.generate.__doc__\n"
            "import pydoc\n"  # help()'s text: the signature line names the real parameters
            "head = pydoc.render_doc(jaxlm.generate, renderer=pydoc.plaintext).splitlines()[2]\n"
            "assert head.startswith('generate(params, cfg, prompts, *,') and '**' not in head\n"
            "assert 'max_new_tokens' in head and 'num_beams' in head, head\n"
            "try:\n"
            "    jaxlm.model.no_such_module\n"
            "except AttributeError as e:\n"
            "    assert 'no_such_module' in str(e)\n"
            "else:\n"
            "    raise SystemExit('no AttributeError')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# ---------------------------------------------------------------- `jaxlm config`

def test_every_key_has_a_type_a_default_and_a_meaning():
    """The meanings are the comments at the dataclass fields (one source): a key added
    without one fails here."""
    from jaxlm.config import _all_keys, describe_keys
    docs = describe_keys()
    assert [d.key for d in docs] == _all_keys(Config)
    missing = [d.key for d in docs if not d.meaning.strip()]
    assert not missing, f"config keys without a meaning (a comment at the field): {missing}"
    by_key = {d.key: d for d in docs}
    assert by_key["train.lora.rank"][1:4] == ("int", 0, 0)
    assert by_key["model.rope.yarn.truncate"].type == "bool"
    assert by_key["generate.early_stopping"].type == "bool|str"
    assert by_key["generate.stop_ids"].type == "list" and by_key["generate.stop_ids"].default == []
    assert by_key["mesh.rules"].type == "mapping"
    assert by_key["mesh.rules"].default["seq"] == ["context"]
    assert "MQA" in by_key["model.n_kv_heads"].meaning  # the trailing comment
    assert "mscale_all_dim" in by_key["model.rope.yarn.mscale"].meaning  # the lines above


def test_field_docs_reads_the_comments_above_and_beside_a_field():
    import dataclasses
    from jaxlm.config import field_docs

    @dataclasses.dataclass
    class Section:
        plain: int = 0
        beside: int = 0  # said beside
        # said above,
        # on two lines
        above: int = 0  # and beside

        # a heading for what follows: nobody's meaning

        after_heading: str = ""  # noqa: E501
        _prefix = "x."  # not a field

    assert field_docs(Section) == {"plain": "", "beside": "said beside",
                                   "above": "said above, on two lines and beside",
                                   "after_heading": ""}


def test_described_values_are_the_resolved_config():
    from jaxlm.config import describe_keys
    docs = {d.key: d for d in describe_keys(load_config("tiny-llama", ["train.lora.rank=4"]))}
    assert docs["model.d_model"].value == 192 and docs["model.d_model"].default == 256
    assert docs["model.n_kv_heads"].value == 2 and docs["model.head_dim"].value == 32
    assert docs["train.lora.rank"].value == 4
    assert docs["run_dir"].value == "runs/tiny-llama"


def test_select_keys_by_section_key_or_old_name():
    from jaxlm.config import config_sections, describe_keys, select_keys
    docs = describe_keys()
    assert {"model", "model.rope", "model.rope.yarn", "model.moe", "model.mla", "data", "train",
            "train.lora", "train.dpo", "train.kto", "train.reward", "train.distill",
            "train.grpo", "train.ppo", "mesh", "generate", "serve"} == set(config_sections())
    lora = [d.key for d in select_keys(docs, ["train.lora"])]
    assert lora == ["train.lora.rank", "train.lora.alpha", "train.lora.targets",
                    "train.lora.base_dtype", "train.lora.init_from"]
    assert [d.key for d in select_keys(docs, ["train.lora_rank"])] == ["train.lora.rank"]
    assert [d.key for d in select_keys(docs, ["run_dir", "train.dpo.beta"])] == [
        "train.dpo.beta", "run_dir"]
    assert len(select_keys(docs, [])) == len(docs)
    train = select_keys(docs, ["train"])
    assert "train.dpo.loss" in {d.key for d in train} and all(
        d.key.startswith("train.") for d in train)
    with pytest.raises(ConfigError, match=r"unknown config section or key 'trian' "
                                          r"\(did you mean 'train'\?\); sections: model, "):
        select_keys(docs, ["trian"])
