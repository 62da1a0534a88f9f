"""ModelConfig: the model's shape and numerics, a frozen (hashable) dataclass.

Every section is frozen, so a `ModelConfig` can be a static argument of
`jax.jit`. Inconsistent values stop with one `ConfigError` line naming the key.
The run configs (data, train, mesh, generate) and the YAML / `a.b=value`
loader are `jaxlm.config`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..errors import ConfigError

# generate.kv_dtype: the KV cache's storage (auto: the model's compute dtype; the
# quantized formats: jaxlm.model.kv.quant)
KV_DTYPES = ("auto", "int8", "int4", "fp8")

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class YarnConfig:
    """YaRN's ramp and attention factor (`model.rope.scaling=yarn`; HF rope_parameters'
    beta_fast, beta_slow, mscale, mscale_all_dim, truncate)."""
    _prefix = "model.rope.yarn."  # key path in error messages (not a field)

    # dimensions turning more often than this over original_max_len keep their frequency
    beta_fast: float = 32.0
    beta_slow: float = 1.0  # dimensions turning fewer times are fully interpolated (/ factor)
    # with mscale_all_dim: the attention factor is mscale(factor, mscale) / mscale(factor,
    # mscale_all_dim) (DeepSeek's); 0: unset
    mscale: float = 0.0
    mscale_all_dim: float = 0.0  # see mscale; 0: unset
    truncate: bool = True  # floor / ceil the ramp's bounds to whole dimensions


@dataclass(frozen=True)
class RopeConfig:
    """Rotary positions (`model.positions=rope`) and their long-context scaling
    (layers/positions.py)."""
    _prefix = "model.rope."

    theta: float = 10000.0  # base of the rotary frequencies
    # long-context scaling: none | llama3 | linear | dynamic | yarn | longrope
    scaling: str = "none"
    factor: float = 8.0  # the scaling factor: how many times longer the context gets
    # llama3: wavelengths longer than original_max_len / low_freq_factor are scaled by factor
    low_freq_factor: float = 1.0
    # llama3: wavelengths shorter than original_max_len / high_freq_factor keep theirs
    # (between the two bounds: interpolated)
    high_freq_factor: float = 4.0
    original_max_len: int = 8192  # llama3, yarn: pretraining length; dynamic: NTK from here
    # yarn: cos/sin scale, 0: 0.1 * ln(factor) + 1; longrope: 0: sqrt(1 + ln(factor) /
    # ln(original_max_len)) (1 when factor is 1)
    attention_factor: float = 0.0
    yarn: YarnConfig = field(default_factory=YarnConfig)
    # longrope (Phi-3): per-frequency divisors [head_dim / 2] of the rotary frequencies for a
    # call whose row reaches past original_max_len (long) or not (short)
    short_factor: tuple = ()
    long_factor: tuple = ()  # see short_factor
    # RoPE base of the local (sliding-window) layers of model.layer_pattern, without scaling
    # (Gemma 3: 10000); 0: the same rotary embedding as the global layers
    local_theta: float = 0.0

    def __post_init__(self):
        _section_type(self, "yarn", YarnConfig)
        _positive(self, "theta")
        _choice(self, "scaling", ("none", "llama3", "linear", "dynamic", "yarn", "longrope"))
        if self.local_theta < 0:
            raise ConfigError(f"model.rope.local_theta={self.local_theta} must be >= 0 (0: theta)")
        for name in ("short_factor", "long_factor"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or not all(
                    isinstance(x, (int, float)) and x > 0 for x in v):
                raise ConfigError(f"model.rope.{name}={v!r:.60} must be a list of numbers > 0")
            object.__setattr__(self, name, tuple(float(x) for x in v))
        if self.scaling == "none":
            return
        if self.scaling == "longrope" and not (self.short_factor and self.long_factor):
            raise ConfigError("model.rope.scaling='longrope' needs model.rope.short_factor and "
                              "model.rope.long_factor")
        if not self.factor >= 1:
            raise ConfigError(f"model.rope.factor={self.factor} must be >= 1 "
                              f"for model.rope.scaling={self.scaling!r}")
        if self.original_max_len <= 0:
            raise ConfigError(f"model.rope.original_max_len={self.original_max_len} must be > 0")
        if self.scaling == "yarn":
            y = self.yarn
            if not y.beta_fast >= y.beta_slow > 0:
                raise ConfigError(f"model.rope.yarn.beta_fast={y.beta_fast} must be >= "
                                  f"model.rope.yarn.beta_slow={y.beta_slow} > 0")
            if min(self.attention_factor, y.mscale, y.mscale_all_dim) < 0:
                raise ConfigError("model.rope.attention_factor, model.rope.yarn.mscale and "
                                  "model.rope.yarn.mscale_all_dim must be >= 0 (0: unset)")


@dataclass(frozen=True)
class MoeConfig:
    """Mixture of experts in every layer's MLP (layers/moe.py); n_experts 0: a dense MLP."""
    _prefix = "model.moe."

    n_experts: int = 0  # 0: dense MLP; E: mixture of experts in every layer
    experts_per_token: int = 2  # experts each token is routed to (top k)
    capacity_factor: float = 0.0  # 0: dropless; c: each expert takes c * T * k / E tokens
    aux_loss_coef: float = 0.02  # weight of the router's load-balancing loss
    z_loss_coef: float = 0.001  # weight of the router's z-loss
    # the k selected experts' weights sum to 1 (Mixtral, Qwen3-MoE's norm_topk_prob);
    # false: each is its softmax probability over all experts
    normalize_top_k: bool = True
    # the router's scores: softmax (Mixtral, Qwen3-MoE) | sigmoid (DeepSeek-V3: selection
    # by score + a per-expert bias (`router_bias`, e_score_correction_bias; selection only,
    # no gradient), weights the selected experts' scores)
    router: str = "softmax"
    # group-limited routing (DeepSeek-V3's n_group / topk_group): experts in n_groups equal
    # groups, a group scored by the sum of its two best scores; tokens pick experts only
    # in their topk_groups best groups. 1 and 1: no limit
    n_groups: int = 1
    topk_groups: int = 1  # see n_groups
    routed_scale: float = 1.0  # the routed experts' weights times this (routed_scaling_factor)
    # shared experts beside the routed ones, run by every token as one SwiGLU MLP of
    # n_shared * d_ff (DeepSeek-V3's n_shared_experts); 0: none
    n_shared: int = 0
    # the first N layers have a dense MLP instead (DeepSeek-V3's first_k_dense_replace):
    # their own scanned stack (params "dense_layers"), the rest the MoE stack
    first_dense: int = 0
    dense_d_ff: int = 0  # those dense layers' MLP hidden size; 0: model.d_ff

    def __post_init__(self):
        if self.n_experts < 0 or self.capacity_factor < 0:
            raise ConfigError("model.moe.n_experts and model.moe.capacity_factor must be >= 0")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(f"model.moe.experts_per_token={self.experts_per_token} must be in "
                              f"[1, model.moe.n_experts={self.n_experts}]")
        _choice(self, "router", ("softmax", "sigmoid"))
        if min(self.n_shared, self.first_dense, self.dense_d_ff) < 0 or self.routed_scale <= 0:
            raise ConfigError("model.moe.n_shared, first_dense and dense_d_ff must be >= 0 and "
                              "model.moe.routed_scale > 0")
        g, tg = self.n_groups, self.topk_groups
        if not 1 <= tg <= g or (self.n_experts and (self.n_experts % g or
                                                    (g > 1 and self.n_experts // g < 2))):
            raise ConfigError(f"model.moe.n_groups={g} must divide model.moe.n_experts="
                              f"{self.n_experts} (2+ experts a group) and model.moe.topk_groups="
                              f"{tg} be in [1, n_groups]")
        if g > 1 and self.router != "sigmoid":
            raise ConfigError(f"model.moe.n_groups={g} needs model.moe.router=sigmoid")


@dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention (DeepSeek-V2/V3; layers/attention.py): q through a
    low-rank path, K and V from one compressed latent plus a shared RoPE key part.
    kv_lora_rank 0: off (the usual q, k, v projections)."""
    _prefix = "model.mla."

    q_lora_rank: int = 0  # q's low-rank width (q_a, its RMSNorm, q_b); 0: one q projection
    kv_lora_rank: int = 0  # the K/V latent's width (kv_a, its RMSNorm, kv_b); 0: MLA off
    qk_nope_head_dim: int = 128  # the part of each q/k head without RoPE (from the latent)
    qk_rope_head_dim: int = 64  # the RoPE part of each q head and the one shared key part
    v_head_dim: int = 128  # each value head's size
    # HF rope_interleave: the RoPE dims rotate in adjacent pairs (x0, x1), (x2, x3), ...
    # (DeepSeek's checkpoints); false: pairs (i, i + d/2)
    rope_interleave: bool = True

    def __post_init__(self):
        if min(self.q_lora_rank, self.kv_lora_rank) < 0:
            raise ConfigError("model.mla.q_lora_rank and kv_lora_rank must be >= 0")
        if self.kv_lora_rank:
            _positive(self, "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"model.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be "
                                  "even")


@dataclass(frozen=True)
class ModelConfig:
    _prefix = "model."  # key path in error messages (not a field)

    family: str = "decoder"  # the architecture: decoder | encoder | encoder_decoder
    vocab_size: int = 32000  # token ids the embedding (and output head) cover
    d_model: int = 256  # hidden size: the width of the residual stream
    n_layers: int = 4  # transformer blocks (encoder_decoder: the encoder's)
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int = 0  # key/value heads; 0: same as n_heads (MHA); 1: MQA; between: GQA
    head_dim: int = 0  # the size of each head; 0: d_model // n_heads
    d_ff: int = 1024  # the MLP's hidden size (each expert's, with MoE)
    max_seq_len: int = 2048  # the longest sequence (learned positions, KV cache) it takes
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5  # the norms' epsilon
    # pre (before each sublayer: GPT-2, Llama, T5) | post (BERT) | sandwich (pre, and a norm
    # on each sublayer's output before the residual add: Gemma 2 and 3)
    norm_position: str = "pre"
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + scale) (Gemma; scales init 0)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    mlp: str = "swiglu"  # the MLP: swiglu | geglu (gated) | gelu | relu
    gelu_approximate: bool = False  # tanh-approximated GELU (GPT-2's "gelu_new")
    positions: str = "rope"  # rope | learned | sinusoidal | alibi | t5_relative | none
    relative_buckets: int = 32  # t5_relative: relative-distance buckets
    relative_max_distance: int = 128  # t5_relative: distances from here on share the last bucket
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT: 2; 0: none
    n_decoder_layers: int = 0  # encoder_decoder: decoder depth (0: n_layers)
    attn_scale: float = 0.0  # attention scores' scale; 0: head_dim ** -0.5; T5: 1.0
    attn_logit_softcap: float = 0.0  # 0: off; c: scores -> c * tanh(scores / c) (Gemma 2)
    final_logit_softcap: float = 0.0  # 0: off; c: logits -> c * tanh(logits / c) (Gemma 2)
    rope: RopeConfig = field(default_factory=RopeConfig)  # rope.theta, rope.scaling, ...
    qkv_bias: bool = False  # biases on the q, k, v projections
    out_bias: bool = False  # a bias on the attention output projection
    mlp_bias: bool = False  # biases on the MLP's projections
    sliding_window: int = 0  # 0: full attention; W: a token sees the last W positions
    # local / global layers by pattern, repeated from layer 0: "l" a sliding-window layer
    # (model.sliding_window, RoPE base model.rope.local_theta), "g" a global one (full
    # attention, model.rope); Gemma 2: "lg", Gemma 3: "lllllg". "": every layer alike
    layer_pattern: str = ""
    moe: MoeConfig = field(default_factory=MoeConfig)  # moe.n_experts 0: dense MLPs
    mla: MlaConfig = field(default_factory=MlaConfig)  # mla.kv_lora_rank 0: no latent attention
    tie_embeddings: bool = False  # the output head is the input embedding (transposed)
    # multi-token prediction (DeepSeek-V3): D sequential modules after the model, module k
    # predicting the token k + 1 ahead (trained with train.mtp_loss_weight; the drafts of
    # self-speculative decoding: draft="mtp", jaxlm generate --draft mtp); each one layer
    # of the model's kind, eh_proj, its norms, the shared embedding and head
    mtp_depth: int = 0
    head: bool = True  # false: no output head (a base model, e.g. HF LlamaModel): hidden states only
    # Sequence classification (HF *ForSequenceClassification, reward models): N > 0 puts a
    # score head over N labels where the LM / MLM head would be (model/layers/score.py);
    # 1: a regression (one score). 0: the LM head.
    num_labels: int = 0
    # num_labels > 0, decoders: pool at the last token that is not this id (HF's
    # config.pad_token_id rule); -1: none, the last (unmasked) position
    pad_token_id: int = -1
    label_names: tuple = ()  # num_labels > 0: HF id2label's names (): LABEL_0, LABEL_1, ...
    dtype: str = "float32"  # activations and matmuls: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # the parameters (master weights): float32 | bfloat16 | float16
    # "" (the weights at param_dtype) | int8 | int4 | nf4 | fp8: the layer matmul weights
    # quantized, dequantized in the matmul (model/qformat.py; written by `jaxlm quantize`;
    # inference only). int8: per-output-channel float32 scales; fp8: E4M3 with
    # per-output-channel scales; int4 (zero point) and nf4 (QLoRA's NormalFloat): 4-bit
    # codes, two per byte, with a float32 scale per model.quant_group input rows
    weight_dtype: str = ""
    # int4 / nf4 weights (and train.lora.base_dtype int4 / nf4): input rows per scale; it
    # must divide every quantized weight's input dimension; 0: one scale per output channel
    quant_group: int = 128
    init_std: float = 0.02  # standard deviation of the initial weights (normal)
    # activation checkpointing of each layer: none | full (recompute all in the backward) |
    # dots (keep the matmul outputs) | dots_no_batch (those without a batch dimension)
    remat: str = "none"
    # the attention kernel: auto (the fastest validated one: xla on CPU, cuDNN on GPU, splash
    # on TPU) | xla (the reference) | pallas | cudnn
    attention_impl: str = "auto"

    # Dropout while training, for the encoder / encoder_decoder families (BERT, T5):
    # off in eval and generation; keyed by (train.seed, step), so resume is exact.

    dropout: float = 0.0  # on the embeddings and every residual branch; 0: off
    attention_dropout: float = 0.0  # on the attention probabilities (xla only); 0: off

    def __post_init__(self):
        _section_type(self, "rope", RopeConfig)
        _section_type(self, "moe", MoeConfig)
        _section_type(self, "mla", MlaConfig)
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
        _choice(self, "family", ("decoder", "encoder", "encoder_decoder"))
        _choice(self, "norm_position", ("pre", "post", "sandwich"))
        _choice(self, "norm", ("rmsnorm", "layernorm"))
        _choice(self, "mlp", ("swiglu", "geglu", "gelu", "relu"))
        _choice(self, "positions", ("rope", "learned", "sinusoidal", "alibi", "t5_relative",
                                    "none"))
        _choice(self, "remat", REMAT_POLICIES)
        _choice(self, "attention_impl", ATTENTION_IMPLS)
        _choice(self, "dtype", DTYPES)
        _choice(self, "param_dtype", DTYPES)
        if self.weight_dtype not in ("", "int8", "int4", "nf4", "fp8"):
            raise ConfigError(f"model.weight_dtype={self.weight_dtype!r} is not one of '' (the "
                              "weights at model.param_dtype), int8, int4, nf4, fp8")
        if self.quant_group < 0:
            raise ConfigError(f"model.quant_group={self.quant_group} must be >= 0 (0: one "
                              "scale per output channel)")
        self._check_mla()
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model} "
                    "(set model.head_dim explicitly or change one of them)")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _positive(self, "n_kv_heads", "head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rope positions")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"model.d_model={self.d_model} must be even for sinusoidal positions")
        if not (self.norm_eps > 0 and self.init_std > 0):
            raise ConfigError("model.norm_eps and model.init_std must be > 0")
        if self.attn_logit_softcap < 0:
            raise ConfigError(f"model.attn_logit_softcap={self.attn_logit_softcap} must be >= 0")
        if self.sliding_window < 0:
            raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 0 (0: off)")
        if self.final_logit_softcap < 0:
            raise ConfigError(f"model.final_logit_softcap={self.final_logit_softcap} must be >= 0")
        self._check_pattern()
        if self.moe.n_experts and self.mlp != "swiglu":
            raise ConfigError(f"model.moe.n_experts={self.moe.n_experts} needs model.mlp='swiglu' "
                              f"(the experts are SwiGLU), not {self.mlp!r}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")
        self._check_labels()
        self._check_mtp()
        if (self.dropout or self.attention_dropout) and self.family == "decoder":
            raise ConfigError("model.dropout and model.attention_dropout are for the encoder and "
                              "encoder_decoder families (BERT, T5); the decoder has none")

    def _check_mla(self):
        """Latent attention: every head its own K/V (n_kv_heads = n_heads), q/k heads of
        qk_nope_head_dim + qk_rope_head_dim (head_dim), RoPE on the rope part only."""
        m = self.mla
        if self.moe.first_dense and not self.moe.n_experts:
            raise ConfigError(f"model.moe.first_dense={self.moe.first_dense} needs "
                              "model.moe.n_experts > 0")
        if self.moe.first_dense >= self.n_layers:
            raise ConfigError(f"model.moe.first_dense={self.moe.first_dense} must be < "
                              f"model.n_layers={self.n_layers}")
        if not m.kv_lora_rank:
            return
        hd = m.qk_nope_head_dim + m.qk_rope_head_dim
        if self.head_dim not in (0, hd) or self.n_kv_heads not in (0, self.n_heads):
            raise ConfigError(f"model.mla.kv_lora_rank={m.kv_lora_rank} sets model.head_dim="
                              f"{hd} (qk_nope + qk_rope) and model.n_kv_heads=n_heads; got "
                              f"head_dim={self.head_dim}, n_kv_heads={self.n_kv_heads}")
        if m.v_head_dim > hd:
            raise ConfigError(f"model.mla.v_head_dim={m.v_head_dim} must be <= qk_nope_head_dim "
                              f"+ qk_rope_head_dim = {hd}")
        bad = [k for k, v in (("positions", self.positions != "rope"), ("qk_norm", self.qk_norm),
                              ("qkv_bias", self.qkv_bias), ("out_bias", self.out_bias),
                              ("family", self.family != "decoder"),
                              ("layer_pattern", bool(self.layer_pattern)),
                              ("rope.scaling", self.rope.scaling == "longrope"))
               if v]
        if bad:
            raise ConfigError(f"model.mla.kv_lora_rank={m.kv_lora_rank} (latent attention) does "
                              f"not take model.{bad[0]}={getattr(self, bad[0].split('.')[0])!r:.40}"
                              " (decoder, rope, no qk_norm, no biases, no pattern, no longrope)")
        object.__setattr__(self, "head_dim", hd)
        object.__setattr__(self, "n_kv_heads", self.n_heads)

    def _check_mtp(self):
        if self.mtp_depth < 0:
            raise ConfigError(f"model.mtp_depth={self.mtp_depth} must be >= 0 (0: off)")
        if not self.mtp_depth:
            return
        bad = [k for k, v in (("family", self.family != "decoder"),
                              ("num_labels", self.num_labels > 0), ("head", not self.head),
                              ("layer_pattern", bool(self.layer_pattern)),
                              ("positions", self.positions in ("alibi", "t5_relative")))
               if v]
        if bad:
            raise ConfigError(f"model.mtp_depth={self.mtp_depth} (multi-token prediction) does "
                              f"not take model.{bad[0]}={getattr(self, bad[0])!r:.40} (a "
                              "decoder LM with one kind of layer and no attention bias)")

    def _check_pattern(self):
        p = self.layer_pattern
        if not isinstance(p, str) or set(p) - set("lg"):
            raise ConfigError(f"model.layer_pattern={p!r} must be a string of 'l' (local) and "
                              "'g' (global) layers")
        if "l" in p and not self.sliding_window:
            raise ConfigError(f"model.layer_pattern={p!r} has local layers: it needs "
                              "model.sliding_window > 0")
        r = self.rope
        if r.scaling == "longrope" and not len(r.short_factor) == len(r.long_factor) == \
                self.head_dim // 2:
            raise ConfigError(f"model.rope.short_factor and long_factor need head_dim / 2 = "
                              f"{self.head_dim // 2} values each, not {len(r.short_factor)} "
                              f"and {len(r.long_factor)}")
        if (self.norm_unit_offset or self.qk_norm) and self.norm != "rmsnorm":
            raise ConfigError("model.norm_unit_offset and model.qk_norm need model.norm=rmsnorm")
        if (p or self.norm_position == "sandwich") and self.family != "decoder":
            raise ConfigError("model.layer_pattern and model.norm_position=sandwich are for the "
                              "decoder family")

    def _check_labels(self):
        if self.num_labels < 0 or self.pad_token_id < -1:
            raise ConfigError(f"model.num_labels={self.num_labels} must be >= 0 (0: the LM head) "
                              f"and model.pad_token_id={self.pad_token_id} >= -1 (-1: none)")
        names = self.label_names
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"model.label_names={names!r} must be a list of strings")
        object.__setattr__(self, "label_names", tuple(names))
        if names and len(names) != self.num_labels:
            raise ConfigError(f"model.label_names has {len(names)} names for "
                              f"model.num_labels={self.num_labels}")
        if self.num_labels and self.family == "encoder_decoder":
            raise ConfigError("model.num_labels > 0 (a score head) is for the decoder and "
                              "encoder families, not encoder_decoder")
        if self.num_labels and not self.head:
            raise ConfigError(f"model.num_labels={self.num_labels} needs model.head=true: the "
                              "score head is the model's output head")

    @property
    def layer_period(self) -> int:
        """How many layers the stack's scan body runs: the length of model.layer_pattern
        when its layers differ, else 1."""
        return len(self.layer_pattern) if len(set(self.layer_pattern)) > 1 else 1

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def lm_head(self) -> bool:
        """Whether the model has the LM (decoder, encoder-decoder) or MLM (encoder) head:
        an output head that is not a score head."""
        return self.head and not self.num_labels


# ---------------------------------------------------------------- validation
# A config section names its keys' prefix in `_prefix` ("model.", "train.", ...),
# so that a check names the full key path.

def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise ConfigError(f"{_section(obj)}{n}={v} must be > 0")


def _choice(obj, name, choices):
    v = getattr(obj, name)
    if v not in choices:
        hint = difflib.get_close_matches(str(v), choices, n=1)
        raise ConfigError(
            f"{_section(obj)}{name}={v!r} is not one of {', '.join(choices)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _section(obj) -> str:
    return getattr(type(obj), "_prefix", "")


def _section_type(obj, name, cls):
    """A nested section must be its frozen dataclass (hashable: ModelConfig is a static
    jit argument), not a dict: build one from a dict with `jaxlm.config`."""
    v = getattr(obj, name)
    if not isinstance(v, cls):
        raise ConfigError(f"{_section(obj)}{name} should be a {cls.__name__}, got "
                          f"{type(v).__name__} {v!r:.60}")


def dtype_of(name: str):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only,
    counted as MaxText's `calculate_tflops_training_per_device` counts them.

    6 * (matmul params, output head included, input embedding excluded since
    it is a gather; for MoE the experts a token visits, plus the router) +
    3 * 4 * layers * seq * heads * head_dim for the two attention matmuls (QK^T
    and PV), halved for causal attention (the decoder family): only the lower
    triangle of the score matrix is useful work. Decoder-only accounting:
    encoder-decoder runs are approximate.
    """
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    attn_proj = d * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    m = cfg.mla
    if m.kv_lora_rank:  # latent attention: q (low-rank), kv_a, kv_b, o
        h = cfg.n_heads
        q = (d * m.q_lora_rank + m.q_lora_rank * h * hd) if m.q_lora_rank else d * h * hd
        attn_proj = (q + d * (m.kv_lora_rank + m.qk_rope_head_dim)
                     + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
                     + h * m.v_head_dim * d)
    gated = 3 if cfg.mlp in ("swiglu", "geglu") else 2
    mlp = gated * d * cfg.d_ff
    if cfg.moe.n_experts:  # each token runs through k experts (+ the shared), the router
        mlp = (cfg.moe.experts_per_token + cfg.moe.n_shared) * mlp + d * cfg.moe.n_experts
    head = d * (cfg.num_labels or cfg.vocab_size)
    k = cfg.moe.first_dense  # DeepSeek's dense first layers
    dense = k * gated * d * (cfg.moe.dense_d_ff or cfg.d_ff)
    # model.mtp_depth modules: eh_proj, one layer (MoE when the model has experts), the head
    mtp = cfg.mtp_depth * (2 * d * d + attn_proj + mlp + head)
    matmul_params = L * attn_proj + (L - k) * mlp + dense + head + mtp
    attn_scores = 12.0 * (L + cfg.mtp_depth) * seq_len * cfg.n_heads * hd
    if cfg.family == "decoder":
        attn_scores /= 2
    return 6.0 * matmul_params + attn_scores


__all__ = ["ModelConfig", "RopeConfig", "YarnConfig", "MoeConfig", "MlaConfig", "dtype_of",
           "model_flops_per_token"]
