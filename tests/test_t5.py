"""T5 (encoder-decoder) against Hugging Face: logits, checkpoints, greedy generation;
span corruption; a few training steps."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import CheckpointError
from jaxlm.infer.generate import generate
from jaxlm.model import forward, model_specs
from jaxlm.config import load_config
from jaxlm.model.hf import config_from_hf, hf_config_from, load_hf, save_hf
from jaxlm.model.layers.relative import relative_buckets
from jaxlm.model.params import abstract
from jaxlm.train import span
from tiny_models import T5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANTS = {
    "v1_0": T5,  # relu, tied
    "v1_1": dataclasses.replace(T5, mlp="geglu", gelu_approximate=True, tie_embeddings=False),
}


def random_params(cfg, seed):
    """Weights well away from init (norm scales != 1, a visible relative bias)."""
    shapes = abstract(model_specs(cfg))
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, s in leaves:
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            x = 1 + 0.2 * rng.standard_normal(s.shape)
        elif "embed" in name or "head" in name or "table" in name:
            x = rng.standard_normal(s.shape)
        else:
            x = 0.15 * rng.standard_normal(s.shape)
        out.append(jnp.asarray(x, jnp.float32))
    return jax.tree_util.tree_unflatten(tree, out)


def to_hf_state(params, cfg):
    """Our params -> a T5ForConditionalGeneration state dict, written out by hand."""
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    lin = lambda w, n_in: t(np.asarray(w).reshape(int(np.prod(w.shape[:n_in])), -1).T)
    sd = {"shared.weight": t(params["embed"]["tokens"])}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = lin(params["head"]["kernel"], 1)
    for stack in ("encoder", "decoder"):
        p = params[stack]
        sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            t(p["relative"]["table"])
        sd[f"{stack}.final_layer_norm.weight"] = t(p["final_ln"]["scale"])
        for i in range(p["layers"]["ln1"]["scale"].shape[0]):
            a = jax.tree.map(lambda x: np.asarray(x[i]), p["layers"])
            pre = f"{stack}.block.{i}.layer."
            groups = [("0.SelfAttention", "attn", "0.layer_norm", "ln1")]
            if stack == "decoder":
                groups.append(("1.EncDecAttention", "cross", "1.layer_norm", "ln_cross"))
            for theirs, ours, ln_theirs, ln in groups:
                for w in "qkv":
                    sd[f"{pre}{theirs}.{w}.weight"] = lin(a[ours][w], 1)
                sd[f"{pre}{theirs}.o.weight"] = lin(a[ours]["o"], 2)
                sd[f"{pre}{ln_theirs}.weight"] = t(a[ln]["scale"])
            ff = f"{pre}{1 if stack == 'encoder' else 2}."
            sd[f"{ff}layer_norm.weight"] = t(a["ln2"]["scale"])
            if cfg.mlp == "relu":
                sd[f"{ff}DenseReluDense.wi.weight"] = lin(a["mlp"]["up"], 1)
            else:
                sd[f"{ff}DenseReluDense.wi_0.weight"] = lin(a["mlp"]["gate"], 1)
                sd[f"{ff}DenseReluDense.wi_1.weight"] = lin(a["mlp"]["up"], 1)
            sd[f"{ff}DenseReluDense.wo.weight"] = lin(a["mlp"]["down"], 1)
    return sd


def hf_model(cfg, params):
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
        num_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers,
        num_heads=cfg.n_heads, relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        feed_forward_proj="relu" if cfg.mlp == "relu" else "gated-gelu",
        decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    if not cfg.tie_embeddings:  # transformers 5 ties in memory whatever the config says
        model.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    missing, unexpected = model.load_state_dict(to_hf_state(params, cfg), strict=False)
    assert not unexpected and all("embed_tokens" in m or m == "lm_head.weight" for m in missing), \
        (missing, unexpected)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    cfg = VARIANTS[request.param]
    params = random_params(cfg, seed=sorted(VARIANTS).index(request.param))
    return cfg, params, hf_model(cfg, params)


def batch(seed=0):
    """Encoder inputs with padding in row 1; decoder inputs with padding in row 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 99, (2, 13))
    enc_mask = np.ones((2, 13), np.int32)
    enc_mask[1, 8:] = 0
    dec = rng.integers(2, 99, (2, 7))
    dec[:, 0] = 0
    dec_mask = np.ones((2, 7), np.int32)
    dec_mask[0, 5:] = 0
    return ids, enc_mask, dec, dec_mask


def hf_logits(model, ids, enc_mask, dec, dec_mask=None):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(enc_mask),
                     decoder_input_ids=torch.tensor(dec),
                     decoder_attention_mask=None if dec_mask is None else torch.tensor(dec_mask)
                     ).logits.numpy()


_forward = jax.jit(forward, static_argnums=1)


def ours_logits(params, cfg, ids, enc_mask, dec, dec_mask=None):
    logits, _ = _forward(params, cfg, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(enc_mask),
                        None if dec_mask is None else jnp.asarray(dec_mask))
    return np.asarray(logits)


# ------------------------------------------------------------------ model


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-300, 300)
    for bidirectional in (True, False):
        for nb, md in ((8, 16), (32, 128)):
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, nb, md)
            ours = relative_buckets(jnp.asarray(rel), bidirectional=bidirectional,
                                    num_buckets=nb, max_distance=md)
            np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_logits_match_transformers(variant):
    cfg, params, model = variant
    ids, enc_mask, dec, dec_mask = batch()
    ref = hf_logits(model, ids, enc_mask, dec, dec_mask)
    ours = ours_logits(params, cfg, ids, enc_mask, dec, dec_mask)
    valid = dec_mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4
    # Encoder padding is really masked: changing padded tokens changes nothing.
    ids2 = ids.copy()
    ids2[1, 8:] = (ids2[1, 8:] + 1) % 99
    np.testing.assert_allclose(ours_logits(params, cfg, ids2, enc_mask, dec, dec_mask)[valid],
                               ours[valid], atol=1e-6)


def test_tied_head_scaling_and_specs():
    v10, v11 = VARIANTS["v1_0"], VARIANTS["v1_1"]
    p10, p11 = abstract(model_specs(v10)), abstract(model_specs(v11))
    assert "head" not in p10 and p11["head"]["kernel"].shape == (32, 99)
    assert p10["encoder"]["layers"]["attn"]["q"].shape == (2, 32, 4, 8)
    assert p10["decoder"]["layers"]["cross"]["o"].shape == (2, 4, 8, 32)
    assert p10["encoder"]["relative"]["table"].shape == (8, 4)
    assert "gate" in p11["decoder"]["layers"]["mlp"]
    assert "gate" not in p10["encoder"]["layers"]["mlp"]


# ------------------------------------------------------------------ HF checkpoints


def test_save_t5_loads_in_transformers(variant, tmp_path):
    cfg, params, _ = variant
    save_hf(tmp_path, cfg, params, max_shard_bytes=40_000)  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, enc_mask, dec, _ = batch(1)
    ref = hf_logits(model, ids, enc_mask, dec)
    np.testing.assert_allclose(ours_logits(params, cfg, ids, enc_mask, dec), ref, atol=1e-4)
    cfg2, params2 = load_hf(tmp_path)  # and back
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_load_t5_reads_save_pretrained(variant, tmp_path):
    cfg, _, model = variant
    model.save_pretrained(tmp_path)
    cfg2, params = load_hf(tmp_path)
    assert (cfg2.mlp, cfg2.tie_embeddings) == (cfg.mlp, cfg.tie_embeddings)
    ids, enc_mask, dec, dec_mask = batch(2)
    ref = hf_logits(model, ids, enc_mask, dec, dec_mask)
    ours = ours_logits(params, cfg2, ids, enc_mask, dec, dec_mask)
    valid = dec_mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4


def test_load_t5_errors_name_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file
    cfg = VARIANTS["v1_1"]
    save_hf(tmp_path, cfg, random_params(cfg, 0))
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(CheckpointError, match=f"{name}.*missing"):
        load_hf(tmp_path)
    save_file({**tensors, name: np.zeros((32, 31), np.float32)}, weights)
    with pytest.raises(CheckpointError, match=r"\[32, 31\].*\[32, 32\]"):
        load_hf(tmp_path)


def test_config_from_hf_and_presets():
    t5_small = {"model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64,
                "d_ff": 2048, "num_layers": 6, "num_heads": 8,
                "relative_attention_num_buckets": 32, "feed_forward_proj": "relu",
                "layer_norm_epsilon": 1e-6, "n_positions": 512}
    v1_1_small = {"model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64,
                  "d_ff": 1024, "num_layers": 8, "num_decoder_layers": 8, "num_heads": 6,
                  "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                  "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                  "layer_norm_epsilon": 1e-6}
    for hf, preset in ((t5_small, "t5-small"), (v1_1_small, "t5-v1_1-small")):
        assert config_from_hf(hf) == load_config(preset).model, preset
    cfg = config_from_hf(v1_1_small)
    assert (cfg.mlp, cfg.gelu_approximate, cfg.tie_embeddings) == ("geglu", True, False)
    assert config_from_hf(hf_config_from(cfg)) == cfg


# ------------------------------------------------------------------ generation


def test_greedy_generation_matches_transformers(variant):
    cfg, params, model = variant
    rng = np.random.default_rng(5)
    rows = [list(rng.integers(2, 99, n)) for n in (11, 6, 3)]
    n_new = 8
    first = generate(params, cfg, rows, max_new_tokens=n_new, return_logits=True)
    eos = int(first.tokens[1, 2])  # row 1 stops at its third token (others maybe earlier)
    out = generate(params, cfg, rows, max_new_tokens=n_new, eos_id=eos, return_logits=True)
    ids = np.zeros((3, 11), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             do_sample=False, num_beams=1, max_new_tokens=n_new,
                             decoder_start_token_id=0, eos_token_id=eos, pad_token_id=0).numpy()
    assert out.finished[1] and out.lengths[1] <= 3
    for r in range(3):
        n = int(out.lengths[r])
        np.testing.assert_array_equal(out.tokens[r, :n], ref[r, 1:1 + n])
        assert n == n_new or out.tokens[r, n - 1] == eos
        assert (out.tokens[r, n:] == -1).all()
    assert ref.shape[1] == 1 + out.lengths.max()

    # Each step's logits = a full forward pass over the prefix generated so far.
    dec = np.zeros((3, n_new), np.int32)
    dec[:, 1:] = np.maximum(out.tokens[:, :-1], 0)
    enc = jnp.asarray(ids), jnp.asarray(mask)
    for t in range(n_new):
        prefix = (np.arange(n_new)[None] <= t).astype(np.int32).repeat(3, 0)
        full = ours_logits(params, cfg, *map(np.asarray, enc), dec, prefix)
        running = out.lengths > t
        np.testing.assert_allclose(out.logits[running, t], full[running, t], atol=1e-4)


def test_decode_loop_is_traced_once(traces):
    cfg = VARIANTS["v1_0"]
    params = random_params(cfg, 3)
    generate(params, cfg, [[5, 6, 7], [8, 9], [1]], max_new_tokens=5, return_logits=True)
    before = traces.copy()
    out = generate(params, cfg, [[9, 8, 7, 6], [5], [3, 3]], max_new_tokens=9, eos_id=4,
                   return_logits=True)
    assert traces["_run"] == before["_run"]
    assert out.tokens.shape == (3, 9)


def test_int8_kv_cache_logits_and_greedy_ids():
    """generate.kv_dtype=int8 on a tiny T5: the decoder cache and the cross K/V are
    int8 with float32 per-token, per-head scales; logits within the decoder-only
    test's tolerance (3% of the largest |logit|), greedy ids equal float's."""
    cfg = VARIANTS["v1_0"]
    params = random_params(cfg, 3)
    rows = [[5, 6, 7, 40, 2], [8, 9], [11, 60, 3]]
    ref = generate(params, cfg, rows, max_new_tokens=8, return_logits=True)
    q8 = generate(params, cfg, rows, max_new_tokens=8, return_logits=True, kv_dtype="int8")
    np.testing.assert_array_equal(q8.tokens, ref.tokens)
    err = np.max(np.abs(q8.logits - ref.logits), axis=(1, 2))
    assert (err <= 0.03 * np.max(np.abs(ref.logits), axis=(1, 2))).all(), err
    assert (err > 0).all()  # the int8 path did run
    held = {"engine": None}  # the engine that ran: its decoder cache and cross K/V
    generate(params, cfg, rows, max_new_tokens=8, kv_dtype="int8", engine_options=held)
    state = held["engine"].state
    for tree, length in ((state.kv, 128), (state.cross, 16)):
        assert tree["k"].dtype == tree["v"].dtype == jnp.int8
        assert tree["k_scale"].dtype == tree["v_scale"].dtype == jnp.float32
        assert tree["k_scale"].shape == (2, 3, length, cfg.n_kv_heads)
    # int4 (two values per byte) in the same run: cache and cross K/V packed, logits
    # within the decoder-only test's int4 tolerance (tests/test_kv_quant.py)
    held = {"engine": None}
    q4 = generate(params, cfg, rows, max_new_tokens=8, return_logits=True, kv_dtype="int4",
                  engine_options=held)
    for tree in (held["engine"].state.kv, held["engine"].state.cross):
        assert tree["k"].dtype == jnp.uint8 and tree["k"].shape[-1] == cfg.head_dim // 2
    n = 1 + int(np.argmax(np.concatenate([q4.tokens != ref.tokens, [[True]] * 3], 1), 1).min())
    err = np.max(np.abs(q4.logits[:, :n] - ref.logits[:, :n]))
    assert 0 < err <= 0.3 * np.max(np.abs(ref.logits[:, :n])), err


# ------------------------------------------------------------------ span corruption

V = 1000


def test_span_corruption_structure():
    rng = np.random.default_rng(0)
    length, t_len = span.span_lengths(128, 0.15, 3.0)
    n_sent = span.sentinels(128, 0.15, 3.0)
    assert (length, t_len, n_sent) == (142, 28, 7)
    for trial in range(100):
        row = rng.integers(0, V - n_sent, rng.integers(2, length + 1))
        inputs, targets = span.corrupt(row, V, 0.15, 3.0, np.random.default_rng(trial))
        assert len(inputs) <= 128 and len(targets) <= t_len
        in_sent = inputs[inputs >= V - n_sent]
        out_sent = targets[targets >= V - n_sent]
        k = len(in_sent)
        np.testing.assert_array_equal(in_sent, V - 1 - np.arange(k))  # <extra_id_0>, 1, ...
        np.testing.assert_array_equal(out_sent, in_sent)
        assert targets[0] == V - 1 and inputs[-1] == V - k  # T5 layout: ends with noise
        np.testing.assert_array_equal(span.uncorrupt(inputs, targets, V, n_sent), row)


def test_span_noise_density_and_span_length():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, V - 8, (64, 142)).astype(np.int32)
    out = span.span_batch({"tokens": rows, "segment_ids": np.ones_like(rows)}, seq_len=128,
                          vocab_size=V, density=0.15, mean_span_length=3.0, seed=0)
    assert out["tokens"].shape == (64, 128) and out["targets"].shape == (64, 28)
    noise = out["loss_mask"].sum(1) - (out["targets"] >= V - 8).sum(1)
    assert np.all(np.abs(noise / 142 - 0.15) < 0.01)
    masks = [span.noise_mask(1000, 0.15, 3.0, np.random.default_rng(s)) for s in range(20)]
    starts = [np.sum(m & ~np.concatenate([[False], m[:-1]])) for m in masks]
    assert abs(np.mean([m.sum() for m in masks]) / np.mean(starts) - 3.0) < 0.2
    # Decoder inputs are the targets shifted right behind the start id (0).
    np.testing.assert_array_equal(out["decoder_tokens"][:, 1:], out["targets"][:, :-1])
    assert (out["decoder_tokens"][:, 0] == 0).all()
    # Padded rows and tails stay padding.
    short = rows.copy()[:2]
    seg = np.ones_like(short)
    seg[0, 100:] = 0
    seg[1] = 0
    out = span.span_batch({"tokens": short, "segment_ids": seg}, seq_len=128, vocab_size=V,
                          density=0.15, mean_span_length=3.0, seed=0)
    assert out["segment_ids"][1].sum() == 0 and out["loss_mask"][1].sum() == 0
    restored = span.uncorrupt(out["tokens"][0][out["segment_ids"][0] > 0],
                              out["targets"][0][out["loss_mask"][0] > 0], V, 8)
    np.testing.assert_array_equal(restored, short[0, :100])


def test_span_corruption_is_deterministic_per_row():
    rng = np.random.default_rng(2)
    rows = rng.integers(0, V - 8, (6, 142)).astype(np.int32)
    kw = dict(seq_len=128, vocab_size=V, density=0.15, mean_span_length=3.0)
    a = span.span_batch({"tokens": rows, "segment_ids": np.ones_like(rows)}, seed=0, **kw)
    b = span.span_batch({"tokens": rows[::-1], "segment_ids": np.ones_like(rows)}, seed=0, **kw)
    c = span.span_batch({"tokens": rows, "segment_ids": np.ones_like(rows)}, seed=1, **kw)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k][::-1])  # a row's spans depend on it alone
    assert not np.array_equal(a["targets"], c["targets"])  # and on the seed


class _ByteTokenizer:
    vocab_size, pad_id, bos_id, eos_id = 260, 0, 1, 2

    def encode(self, text, split_special_tokens=False):
        return [3 + b for b in text.encode()[:300] if b < 250]


def test_span_batches_resume_exactly():
    from jaxlm.train.data import make_batches
    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 4) for i in range(40)]
    length, _ = span.span_lengths(32, 0.15, 3.0)
    settings = dict(seq_len=32, vocab_size=300, density=0.15, mean_span_length=3.0, seed=0)

    def fresh():
        return span.SpanBatches(make_batches(docs, _ByteTokenizer(), seq_len=length, batch_size=2,
                                             seed=0, num_threads=1), **settings)
    it = fresh()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(2)]
    resumed = fresh()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


# ------------------------------------------------------------------ training


def test_span_training_reduces_the_loss(tmp_path, sp_tokenizer_file):
    from jaxlm.train.loop import train
    reserved = span.sentinels(32, 0.15, 3.0)
    cfg = load_config("tiny-t5", [
        f"model.vocab_size={512 + reserved}", "model.d_model=32", "model.head_dim=8",
        "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=4",
        "data.max_docs=40", "data.shuffle_rows=64", "data.eval_fraction=0.1", "train.steps=16",
        "train.warmup_steps=2", "train.learning_rate=1e-2", "train.eval_every=8",
        "train.eval_batches=2", "train.checkpoint_every=100", "train.log_every=4",
        "mesh.devices=1", f"data.tokenizer={sp_tokenizer_file}",
        f"run_dir={tmp_path / 'run'}"])
    summary = train(cfg, progress=False)
    evals = [e["eval_loss"] for e in summary["eval"]]
    assert [e["step"] for e in summary["eval"]] == [0, 8, 16]
    assert evals[-1] < evals[0] - 0.5, evals
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert rows and all(r["tokens"] > 0 for r in rows)
