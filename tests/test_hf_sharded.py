"""Loading checkpoints straight into their shardings (8 CPU devices): HF dirs read slice
by slice (each device only its own block), jaxlm run dirs through orbax restore args;
`model_config_of` / `load_params` for fine-tuning; the tokenizer of either kind of dir."""

import json
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from jaxlm.errors import CheckpointError  # noqa: E402
from jaxlm.model import logical_axes, model_specs  # noqa: E402
from jaxlm.config import MeshConfig  # noqa: E402
from jaxlm.model.hf import io as hf_io  # noqa: E402
from jaxlm.model.hf.rules import Rule, linear, merged  # noqa: E402
from jaxlm.sharding.mesh import make_mesh  # noqa: E402
from jaxlm.sharding.rules import partition_spec  # noqa: E402

MESHES = {"data2_fsdp4": MeshConfig(data=2, fsdp=4), "fsdp2_tensor4": MeshConfig(data=1, fsdp=2,
                                                                                  tensor=4)}
# heads over fsdp and head_dim over tensor: q's HF rows [H*hd] are cut twice, so each device
# reads the enclosing slab (its heads, every head_dim): 4x its shard for q/k/v, o and biases.
SLAB_RULES = (("embed", None), ("heads", "fsdp"), ("kv_heads", "fsdp"), ("head_dim", "tensor"),
              ("mlp", "tensor"), ("vocab", "tensor"))


def _random_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A Llama (GQA, q/k/v biases, untied head) and a GPT-2 (fused c_attn) dir."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    llama = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, attention_bias=True,
        max_position_embeddings=64, tie_word_embeddings=False)
    _random_weights(transformers.LlamaForCausalLM(llama)).save_pretrained(root / "llama")
    gpt2 = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                   n_positions=32, bos_token_id=None, eos_token_id=None)
    _random_weights(transformers.GPT2LMHeadModel(gpt2)).save_pretrained(root / "gpt2")
    return {"llama": root / "llama", "gpt2": root / "gpt2"}


@pytest.fixture(scope="module")
def unsharded(hf_dirs):
    return {name: jaxlm.load(str(path)) for name, path in hf_dirs.items()}


def leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def assert_placed(cfg, params, mesh, rules):
    axes = jax.tree.leaves(logical_axes(model_specs(cfg)), is_leaf=lambda x: isinstance(x, tuple))
    for (path, leaf), names in zip(leaves(params), axes):
        assert leaf.sharding.mesh == mesh, path
        assert leaf.sharding.spec == partition_spec(names, rules), (path, leaf.sharding.spec)
        shard = leaf.sharding.shard_shape(leaf.shape)
        assert all(s.data.shape == shard for s in leaf.addressable_shards), path


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_hf_dir_loads_into_the_rules_shardings(hf_dirs, unsharded, family, mesh_name):
    mesh = make_mesh(MESHES[mesh_name])
    cfg, params = jaxlm.load(str(hf_dirs[family]), mesh=mesh)
    ref_cfg, ref = unsharded[family]
    assert cfg == ref_cfg and cfg.param_dtype == "float32"
    assert_placed(cfg, params, mesh, MeshConfig().rules)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_mixtral_experts_load_sharded_in_both_layouts(tmp_path):
    """Experts over `expert`, their mlp over `tensor`: per-expert tensors (only the experts
    in a device's range are read) and the fused gate_up_proj (a chunk of a fused axis)."""
    torch.manual_seed(1)
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64)
    model = _random_weights(transformers.MixtralForCausalLM(config))
    model.save_pretrained(tmp_path / "per_expert")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    with hf_io.safe_open(str(tmp_path / "fused" / "model.safetensors"), "numpy") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    _, ref = jaxlm.load(str(tmp_path / "per_expert"))
    for layout in ("per_expert", "fused"):
        cfg, params = jaxlm.load(str(tmp_path / layout), mesh=mesh)
        assert_placed(cfg, params, mesh, MeshConfig().rules)
        assert params["layers"]["mlp"]["gate"].sharding.spec[1] == "expert"
        jax.tree.map(np.testing.assert_array_equal, params, ref)


class Reads:
    """Wraps safetensors' safe_open: records the bytes of every tensor slice read."""

    def __init__(self, monkeypatch):
        self.log = []
        real = hf_io.safe_open
        log = self.log

        class Slice:
            def __init__(self, inner):
                self.inner = inner

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, index):
                out = self.inner[index]
                log.append(out.nbytes)
                return out

        class Open:
            def __init__(self, path, framework):
                self.cm = real(path, framework=framework)

            def __enter__(self):
                self.f = self.cm.__enter__()
                return self

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, name):
                return Slice(self.f.get_slice(name))

            def get_tensor(self, name):
                out = self.f.get_tensor(name)
                log.append(out.nbytes)
                return out

        monkeypatch.setattr(hf_io, "safe_open", Open)


@pytest.mark.parametrize("family, mesh_name, rules, slab", [
    ("llama", "data2_fsdp4", None, 1), ("gpt2", "fsdp2_tensor4", None, 1),
    ("llama", "fsdp2_tensor4", SLAB_RULES, 4)])
def test_each_device_reads_only_its_own_slice(hf_dirs, unsharded, monkeypatch, family,
                                               mesh_name, rules, slab):
    """Per sharded leaf: one read per distinct device block (replicas share it), each
    reading exactly its shard's bytes (x4 where the rules cut merged HF axes twice: the
    documented slab), in reads of at most that each; a replicated leaf is read once."""
    from jaxlm.model.hf import rules as hf_rules
    reads = Reads(monkeypatch)
    blocks = {}  # leaf path -> [(block, bytes read, largest single read)]
    real = hf_rules._read_block

    def spy(reader, rule, spec, names, index):
        before = len(reads.log)
        out = real(reader, rule, spec, names, index)
        new = reads.log[before:]
        blocks.setdefault(rule.path, []).append((out, sum(new), max(new)))
        return out

    monkeypatch.setattr(hf_rules, "_read_block", spy)
    mesh = make_mesh(MESHES[mesh_name])
    cfg, params = jaxlm.load(str(hf_dirs[family]), mesh=mesh, rules=rules)
    jax.tree.map(np.testing.assert_array_equal, params, unsharded[family][1])
    named = {tuple(k.key for k in path): leaf for path, leaf in leaves(params)}
    assert set(blocks) == set(named)
    for path, reads_of_leaf in blocks.items():
        leaf = named[path]
        sharding = leaf.sharding
        if sharding.is_fully_replicated:
            assert len(reads_of_leaf) == 1 and reads_of_leaf[0][0].shape == leaf.shape
            continue
        shard = sharding.shard_shape(leaf.shape)
        distinct = {tuple((s.start, s.stop) for s in index) for index in
                    sharding.devices_indices_map(leaf.shape).values()}
        assert len(reads_of_leaf) == len(distinct), path  # replicas share one read
        factor = slab if {"fsdp", "tensor"} <= set(sharding.spec) else 1  # attention leaves
        expected = math.prod(shard) * 4 * factor  # float32 checkpoint
        for out, nbytes, largest in reads_of_leaf:
            assert out.shape == shard  # exactly one device's block
            assert nbytes == expected and largest <= expected, (path, sharding.spec)
            assert nbytes < math.prod(leaf.shape) * 4  # never a whole sharded leaf
    assert sum(not leaf.sharding.is_fully_replicated for leaf in named.values()) > len(named) // 2


def test_hf_block_maps_any_block_back_to_the_hf_tensor():
    """Rule.hf_block against the oracle: the whole tensor transformed, then sliced."""
    rng = np.random.default_rng(0)
    cases = [(Rule((), "q", linear(1, 3)), (4, 3, 5)),        # HF [H*hd, D]
             (Rule((), "o", linear(2, 3)), (3, 5, 4)),        # HF [D, H*hd]
             (Rule((), "b", merged(2)), (3, 5)),              # HF [H*hd]
             (Rule((), "c", merged(1, 2), (1, 2, 3)), (4, 3, 2)),  # fused c_attn, chunk v
             (Rule((), "g", ((0,), (2,), (1,)), (1, 1, 2)), (2, 4, 3)),  # fused gate_up, up
             (Rule((), "n", None), (6,))]
    for rule, slot in cases:
        hf = rng.standard_normal(rule.hf_shape(slot)).astype(np.float32)
        chunk = hf
        if rule.part:
            axis, j, count = rule.part
            size = hf.shape[axis] // count
            chunk = np.take(hf, range(j * size, (j + 1) * size), axis=axis)
        ours = rule.to_ours(chunk, slot)
        np.testing.assert_array_equal(rule.to_hf(ours), chunk)
        for _ in range(40):
            index = []
            for n in slot:
                a = int(rng.integers(0, n))
                index.append(slice(a, int(rng.integers(a + 1, n + 1))))
            hf_index, wide, within = rule.hf_block(tuple(index), slot)
            got = rule.to_ours(hf[hf_index], wide)[within]
            np.testing.assert_array_equal(got, ours[tuple(index)])


# ------------------------------------------------------------------ both kinds of dirs

@pytest.fixture(scope="module")
def run_dir(hf_dirs, tmp_path_factory):
    """The Llama converted to a jaxlm run dir (the way `jaxlm convert` writes it)."""
    path = str(tmp_path_factory.mktemp("run") / "llama")
    cfg, params = jaxlm.load(str(hf_dirs["llama"]))
    jaxlm.save(path, cfg, params)
    return path


def test_run_dir_restores_sharded(run_dir, unsharded):
    mesh = make_mesh(MESHES["fsdp2_tensor4"])
    cfg, params = jaxlm.load(run_dir, mesh=mesh)
    assert cfg == unsharded["llama"][0]
    assert_placed(cfg, params, mesh, MeshConfig().rules)
    jax.tree.map(np.testing.assert_array_equal, params, unsharded["llama"][1])


def test_model_config_of_and_load_params(hf_dirs, run_dir, unsharded, tmp_path):
    import dataclasses
    from jaxlm.sharding.rules import tree_shardings
    ref_cfg, ref = unsharded["llama"]
    mesh = make_mesh(MESHES["data2_fsdp4"])
    for path in (str(hf_dirs["llama"]), run_dir):
        cfg = jaxlm.model_config_of(path)
        assert cfg == ref_cfg
        cfg = dataclasses.replace(cfg, param_dtype="bfloat16", remat="full")  # overrides
        shardings = tree_shardings(mesh, logical_axes(model_specs(cfg)), MeshConfig().rules)
        params = jaxlm.load_params(path, cfg, shardings)
        assert_placed(cfg, params, mesh, MeshConfig().rules)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b.astype(a.dtype))), params, ref)
        assert params["embed"]["tokens"].dtype == np.dtype("bfloat16")
        wrong = dataclasses.replace(ref_cfg, d_ff=48)
        with pytest.raises(CheckpointError, match=r"48") as e:
            jaxlm.load_params(path, wrong)
        assert "\n" not in str(e.value)
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text(json.dumps({"hidden_size": 3}))
    for bad, needle in ((tmp_path / "nowhere", "does not exist"),
                        (tmp_path / "neither", "neither a jaxlm run dir")):
        for call in (lambda p: jaxlm.model_config_of(p), lambda p: jaxlm.load_params(p, ref_cfg)):
            with pytest.raises(CheckpointError, match=needle) as e:
                call(str(bad))
            assert "\n" not in str(e.value)


def test_tokenizer_of_either_kind_of_dir(hf_dirs, run_dir, tmp_path, sp_tokenizer_dir):
    import shutil

    from jaxlm.model.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    text = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 30
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    sp = sp_tokenizer_dir
    hf_dir, run = tmp_path / "hf", tmp_path / "run"
    shutil.copytree(hf_dirs["llama"], hf_dir)
    shutil.copytree(run_dir, run)
    for d in (hf_dir, run):  # both files in both dirs
        bpe.save(str(d / "tokenizer.json"))
        shutil.copy(sp / "tokenizer.model", d / "tokenizer.model")
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)  # transformers' fast tokenizer
    assert isinstance(load_tokenizer(run), SentencePieceTokenizer)
    assert load_tokenizer(hf_dir).encode("return x") == bpe.encode("return x").ids
    (hf_dir / "tokenizer.json").unlink()
    assert isinstance(jaxlm.load_tokenizer(hf_dir), SentencePieceTokenizer)
