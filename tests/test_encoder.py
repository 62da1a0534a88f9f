"""The encoder family (BERT) against HF BertForMaskedLM; embed; MLM masking and training."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.model import forward, init_params, model_specs
from jaxlm.config import TrainConfig
from jaxlm.model.config import ModelConfig
from jaxlm.model.families.encoder import mlm_head_inputs, mlm_logits
from jaxlm.model.params import abstract
from jaxlm.train.objectives import batch_objective, mlm_corrupt, mlm_key, mlm_mask_id
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import TrainState
from jaxlm.train.step import train_step
import tiny_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = tiny_models.BERT  # vocab 99, d_model 48, 4 heads, d_ff 80, 64 positions


def hf_config(**overrides):
    return transformers.BertConfig(
        vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=80, max_position_embeddings=64, type_vocab_size=2, **overrides)


@pytest.fixture(scope="module")
def hf_model():
    """A BertForMaskedLM with random weights everywhere (biases, LayerNorms too)."""
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_bert")
    hf_model.save_pretrained(path)
    return path


def params_from_hf(model, cfg):
    """An HF BertForMaskedLM -> our params, written out by hand (independent of jaxlm.model.hf)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    n, d, h, hd = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim
    layer = lambda name: np.stack([sd[f"bert.encoder.layer.{i}.{name}"] for i in range(n)])
    weight = lambda name: layer(name + ".weight").transpose(0, 2, 1)  # [out, in] -> [in, out]
    norm = lambda prefix: {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}
    layer_norm = lambda prefix: {"scale": layer(prefix + ".weight"), "bias": layer(prefix + ".bias")}
    attn = {}
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        attn[ours] = weight(f"attention.self.{theirs}").reshape(n, d, h, hd)
        attn[ours + "_bias"] = layer(f"attention.self.{theirs}.bias").reshape(n, h, hd)
    attn["o"] = weight("attention.output.dense").reshape(n, h, hd, d)
    attn["o_bias"] = layer("attention.output.dense.bias")
    params = {
        "embed": {"tokens": sd["bert.embeddings.word_embeddings.weight"]},
        "positions": {"table": sd["bert.embeddings.position_embeddings.weight"]},
        "token_types": {"table": sd["bert.embeddings.token_type_embeddings.weight"]},
        "embed_ln": norm("bert.embeddings.LayerNorm"),
        "layers": {"attn": attn, "ln1": layer_norm("attention.output.LayerNorm"),
                   "mlp": {"up": weight("intermediate.dense"),
                           "up_bias": layer("intermediate.dense.bias"),
                           "down": weight("output.dense"), "down_bias": layer("output.dense.bias")},
                   "ln2": layer_norm("output.LayerNorm")},
        "mlm": {"dense": {"kernel": sd["cls.predictions.transform.dense.weight"].T,
                          "bias": sd["cls.predictions.transform.dense.bias"]},
                "ln": norm("cls.predictions.transform.LayerNorm"),
                "bias": sd["cls.predictions.bias"]},
    }
    expected = jax.tree.map(lambda s: s.shape, abstract(model_specs(cfg)))
    assert jax.tree.map(lambda a: a.shape, params) == expected
    return jax.tree.map(jnp.asarray, params)


def inputs(seed=0, batch=3, seq=11):
    """Random tokens and token types; right padding on rows 1 and 2."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 99, (batch, seq))
    types = rng.integers(0, 2, (batch, seq))
    mask = np.ones((batch, seq), np.int32)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return tokens, types, mask


def hf_logits(model, tokens, types, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                     attention_mask=torch.tensor(mask)).logits.numpy()


def assert_close_on(mask, ours, theirs, atol=1e-4):
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(ours)[keep], np.asarray(theirs)[keep], atol=atol,
                               rtol=0)


def test_logits_match_transformers_bert(hf_model):
    tokens, types, mask = inputs()
    ours, aux = forward(params_from_hf(hf_model, TINY), TINY, jnp.asarray(tokens), None,
                        jnp.asarray(mask), token_types=jnp.asarray(types))
    assert ours.dtype == jnp.float32 and ours.shape == (3, 11, 99) and aux == {}
    assert_close_on(mask, ours, hf_logits(hf_model, tokens, types, mask))


def test_load_bert_reads_save_pretrained(hf_model, hf_dir):
    from jaxlm.model.hf import load_hf
    cfg, params = load_hf(hf_dir)
    assert cfg == TINY
    jax.tree.map(np.testing.assert_array_equal, params, params_from_hf(hf_model, TINY))
    tokens, types, mask = inputs(1)
    ours, _ = forward(params, cfg, tokens, None, mask, token_types=types)
    assert_close_on(mask, ours, hf_logits(hf_model, tokens, types, mask))


def test_save_bert_loads_in_transformers(hf_model, tmp_path):
    from jaxlm.model.hf import load_hf, save_hf
    params = params_from_hf(hf_model, TINY)
    save_hf(tmp_path / "out", TINY, params)
    theirs = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    tokens, types, mask = inputs(2)
    ours, _ = forward(params, TINY, tokens, None, mask, token_types=types)
    assert_close_on(mask, ours, hf_logits(theirs, tokens, types, mask))
    cfg, again = load_hf(tmp_path / "out")
    assert cfg == TINY
    jax.tree.map(np.testing.assert_array_equal, again, params)
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf(tmp_path / "out", TINY, params)
    with pytest.raises(ConfigError, match="norm_position=post"):
        save_hf(tmp_path / "pre", dataclasses.replace(TINY, norm_position="pre"), {})


def test_load_bert_sharded_and_errors(hf_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    from jaxlm.model.hf import load_hf
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, params = load_hf(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, params, params_from_hf(hf_model, TINY))

    hf_model.save_pretrained(tmp_path / "one")
    weights = tmp_path / "one" / "model.safetensors"
    tensors = load_file(weights)
    key = "bert.encoder.layer.1.attention.self.key.weight"
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_hf(tmp_path / "one")
    save_file({**missing, key: np.zeros((48, 40), np.float32)}, weights,
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"\[48, 40\].*\[48, 48\]"):
        load_hf(tmp_path / "one")
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    (tmp_path / "one" / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        load_hf(tmp_path / "one")


@pytest.fixture(scope="module")
def params(tiny_bert):
    return tiny_bert.params


def test_embed_is_a_masked_mean_of_hidden_states(params):
    tokens, types, mask = inputs(3)
    vectors = jaxlm.embed(params, TINY, tokens, mask)
    hidden, _ = forward(params, TINY, tokens, None, mask, return_hidden=True)
    hidden, m = np.asarray(hidden), mask[..., None]
    expected = (hidden * m).sum(1) / m.sum(1)
    assert vectors.shape == (3, 48) and vectors.dtype == jnp.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    # A sentence's vector does not depend on the padding after it.
    alone = jaxlm.embed(params, TINY, tokens[2:3, :4], mask[2:3, :4])
    np.testing.assert_allclose(alone[0], vectors[2], atol=1e-5)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_packed_segments_never_attend_across(norm_position):
    cfg = dataclasses.replace(TINY, norm_position=norm_position)
    params = init_params(cfg, jax.random.key(1))
    run = jax.jit(forward, static_argnums=1)
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 99, 6), rng.integers(0, 99, 5)
    pad = lambda *parts: np.concatenate([*parts, np.zeros(13 - sum(map(len, parts)), int)])
    # Row 0: A and B packed; rows 1, 2: A alone, B alone (right-padded).
    tokens = jnp.array([pad(doc_a, doc_b), pad(doc_a), pad(doc_b)])
    seg = jnp.array([pad([1] * 6, [2] * 5), pad([1] * 6), pad([1] * 5)])
    pos = jnp.array([pad(range(6), range(5)), pad(range(6)), pad(range(5))])
    packed, _ = run(params, cfg, tokens, pos, seg)
    np.testing.assert_allclose(packed[0, :6], packed[1, :6], atol=1e-5)
    np.testing.assert_allclose(packed[0, 6:11], packed[2, :5], atol=1e-5)
    # Bidirectional: changing the last token of A changes A's first logits, never B's.
    other, _ = run(params, cfg, tokens.at[0, 5].set((doc_a[5] + 1) % 99), pos, seg)
    assert not np.allclose(other[0, 0], packed[0, 0])
    np.testing.assert_array_equal(other[0, 6:11], packed[0, 6:11])


def test_mlm_masking_statistics():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 90, (64, 512)).astype(np.int32)
    tokens[:, ::50] = 3  # eos: never chosen
    seg = np.ones_like(tokens)
    seg[:, 400:] = 0  # padding: never chosen, never changed
    tokens[:, 400:] = 0
    corrupt = functools.partial(mlm_corrupt, probability=0.15, mask_id=98, random_vocab=98,
                                special_ids=(2, 3))
    inputs_, chosen = jax.jit(corrupt)(jnp.asarray(tokens), jnp.asarray(seg), mlm_key(0, 7))
    inputs_, chosen = np.asarray(inputs_), np.asarray(chosen)
    real = (seg > 0) & (tokens != 3)
    assert not chosen[~real].any()
    np.testing.assert_array_equal(inputs_[~chosen], tokens[~chosen])
    n = chosen.sum()
    assert abs(n / real.sum() - 0.15) < 0.005, n / real.sum()
    masked = (inputs_ == 98) & chosen
    unchanged = (inputs_ == tokens) & chosen
    randomised = chosen & ~masked & ~unchanged
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(randomised.sum() / n - 0.1 * (1 - 1 / 98)) < 0.01  # a random id may be the same
    assert abs(unchanged.sum() / n - 0.1 * (1 + 1 / 98)) < 0.01
    # Deterministic per (seed, step), different across steps, the same traced or not.
    again, _ = corrupt(jnp.asarray(tokens), jnp.asarray(seg), mlm_key(0, 7))
    np.testing.assert_array_equal(again, inputs_)
    traced = jax.jit(lambda s: mlm_key(0, s))(jnp.int32(7))
    np.testing.assert_array_equal(jax.random.key_data(traced), jax.random.key_data(mlm_key(0, 7)))
    other, _ = corrupt(jnp.asarray(tokens), jnp.asarray(seg), mlm_key(0, 8))
    assert (np.asarray(other) != inputs_).any()


class _Tok:
    vocab_size, bos_id, eos_id, pad_id = 98, 2, 3, 0


def test_mask_id_and_objective_checks():
    assert mlm_mask_id(_Tok(), 99) == 98

    class WithMaskPiece(_Tok):  # e.g. an HF BERT tokenizer.json: [MASK] is a piece
        def id_to_piece(self, i):
            return "[MASK]" if i == 4 else f"p{i}"
    assert mlm_mask_id(WithMaskPiece(), 98) == 4
    with pytest.raises(ConfigError, match="model.vocab_size=99"):
        mlm_mask_id(_Tok(), 98)
    with pytest.raises(ConfigError, match="objective=mlm"):
        batch_objective(TrainConfig(objective="clm"), TINY, _Tok())
    assert batch_objective(TrainConfig(), ModelConfig(), _Tok()) is None


def test_chunked_loss_inputs_equal_the_mlm_logits(params):
    """The chunked loss gets (h, w) with the output bias folded in: h @ w == logits."""
    hidden = jax.random.normal(jax.random.key(2), (2, 5, 48))
    h, w = mlm_head_inputs(params, TINY, hidden)
    assert h.shape == (2, 5, 49) and w.shape == (49, 99)
    np.testing.assert_allclose(h @ w, mlm_logits(params, TINY, hidden), atol=1e-5)


def structured_batch(rng, b=8, s=32):
    """Rows of a repeating 8-token pattern (from a few), so context predicts a masked token."""
    patterns = rng.integers(4, 98, (4, 8))
    tokens = np.concatenate([patterns[rng.integers(0, 4, b)]] * (s // 8), axis=1).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[0, 24:] = 0
    return {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(tokens),
            "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
            "segment_ids": jnp.asarray(seg), "loss_mask": jnp.zeros((b, s), jnp.float32)}


def test_mlm_train_steps_reduce_the_loss(params):
    tcfg = TrainConfig(objective="mlm", learning_rate=3e-3, warmup_steps=0, steps=30,
                       weight_decay=0.0)
    objective = batch_objective(tcfg, TINY, _Tok())
    batch = structured_batch(np.random.default_rng(0))
    tx = make_optimizer(tcfg, model_specs(TINY))
    step = jax.jit(functools.partial(train_step, mcfg=TINY, tx=tx,
                                     lr_schedule=lambda s: tcfg.learning_rate, vocab_chunk=40,
                                     objective=objective))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses


def test_bert_tokenizer_adds_cls_sep_and_embed_takes_strings(hf_model, hf_dir, tmp_path):
    """A WordPiece tokenizer.json with BERT's post-processor: `encode(text,
    add_special_tokens=True)` equals BertTokenizerFast(text) ([CLS] ... [SEP]), "[SEP]"
    in the text is its id as in transformers, and `jaxlm.embed(strings, tokenizer=)`
    equals the masked mean of transformers' BertModel hidden states on its batch."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran far away"] * 20,
                            trainers.WordPieceTrainer(vocab_size=99, show_progress=False,
                                                      special_tokens=["[PAD]", "[UNK]", "[CLS]",
                                                                      "[SEP]", "[MASK]"]))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                          sep_token="[SEP]", pad_token="[PAD]",
                                          cls_token="[CLS]", mask_token="[MASK]")
    fast.save_pretrained(tmp_path)
    ours = jaxlm.load_tokenizer(str(tmp_path))
    texts = ["The cat sat on the mat.", "a dog [SEP] ran", "far"]
    for text in texts:
        assert ours.encode(text, add_special_tokens=True) == fast(text)["input_ids"]
        assert ours.encode(text) == fast(text, add_special_tokens=False)["input_ids"]
    assert ours.encode("[SEP]") == [fast.sep_token_id]

    cfg, params = jaxlm.load(str(hf_dir))
    vectors = jaxlm.embed(params, cfg, texts, tokenizer=ours)
    batch = fast(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf_model.bert(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[..., None]
    np.testing.assert_allclose(np.asarray(vectors), (hidden * mask).sum(1) / mask.sum(1),
                               atol=1e-4)
    from jaxlm.errors import InputError
    with pytest.raises(InputError, match="tokenizer="):
        jaxlm.embed(params, cfg, texts)
