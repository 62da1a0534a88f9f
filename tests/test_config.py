"""Config loading: presets, overrides, and one clear line for every mistake."""

import pytest

from jaxlm.errors import ConfigError
from jaxlm.config import Config, config_from_dict, load_config, parse_override, to_dict
from jaxlm.model.config import ModelConfig


PARAMS_B = {"llama3-8b": 8.03, "mistral-7b": 7.24, "qwen2-0.5b": 0.494, "mixtral-8x7b": 46.70,
            "gpt2": 0.1244}


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
