"""The suite's shared tiny models: one config per family, used as module constants
(parametrize ids, jitted helpers) and through conftest.py's session fixtures
(`tiny_llama`, ..., `tiny_checkpoint`), which hold their params and checkpoints.

The suite is bound by compiling many tiny programs, and a jitted function compiles
once per (static config, shapes) in a worker process: the fewer distinct configs
the tests use, the more they share. A test whose assertions need other values
(exact HLO shapes, a vocabulary matching a tokenizer, a transformers model's
dims, a feature flag) keeps its own config or derives one with
`dataclasses.replace`.
"""

import dataclasses

from jaxlm.model.config import ModelConfig, MoeConfig

# Llama-style decoder: RoPE, RMSNorm, SwiGLU, GQA (4 query heads over 2 KV heads).
# init_std 0.2: peaked logits, so greedy choices are not near-ties.
LLAMA = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=256, init_std=0.2)

# GPT-2-style decoder: learned positions, LayerNorm, (tanh) GELU, biases, tied embeddings.
GPT2 = dataclasses.replace(LLAMA, n_kv_heads=4, norm="layernorm", mlp="gelu",
                           gelu_approximate=True, positions="learned", qkv_bias=True,
                           out_bias=True, mlp_bias=True, tie_embeddings=True)

# Mixtral-style MoE decoder: the Llama above with 4 experts, top-2 (dropless).
MIXTRAL = dataclasses.replace(LLAMA, moe=MoeConfig(n_experts=4, experts_per_token=2))

# BERT-style encoder (bert-base's layout, tiny): post-LayerNorm, GELU, learned positions,
# token types, biases everywhere, a tied MLM head.
BERT = ModelConfig(family="encoder", vocab_size=99, d_model=48, n_layers=2, n_heads=4, d_ff=80,
                   max_seq_len=64, type_vocab_size=2, norm="layernorm", norm_eps=1e-12,
                   norm_position="post", mlp="gelu", positions="learned", qkv_bias=True,
                   out_bias=True, mlp_bias=True, tie_embeddings=True)

# T5-style (v1.0) encoder-decoder: relative position buckets, ReLU MLP, no attention
# scaling, tied embeddings.
T5 = ModelConfig(family="encoder_decoder", vocab_size=99, d_model=32, n_layers=2,
                 n_decoder_layers=2, n_heads=4, head_dim=8, d_ff=48, max_seq_len=64,
                 norm_eps=1e-6, positions="t5_relative", relative_buckets=8,
                 relative_max_distance=16, attn_scale=1.0, mlp="relu", tie_embeddings=True)

FAMILIES = {"llama": LLAMA, "gpt2": GPT2, "mixtral": MIXTRAL, "bert": BERT, "t5": T5}

# The shared sentencepiece tokenizer (conftest's `sp_tokenizer`): stdlib text, 512 pieces.
TOKENIZER_VOCAB = 512


def checkpoint_config(family: str) -> ModelConfig:
    """The config of `tiny_checkpoint(family)`: the family's, with the shared tokenizer's
    vocabulary, a 32-token context, and as many KV heads as query heads (so that a
    4-way tensor mesh divides both)."""
    cfg = FAMILIES[family]
    return dataclasses.replace(cfg, vocab_size=TOKENIZER_VOCAB, max_seq_len=32,
                               n_kv_heads=cfg.n_heads)
