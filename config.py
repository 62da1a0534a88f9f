"""Run configs: frozen dataclasses loaded from YAML presets, `a.b=value` overrides.

`Config` holds the model section (`jaxlm.model.config.ModelConfig`) and the
run sections (data, train, mesh, generate). Every section is a frozen
(hashable) dataclass. Unknown keys and inconsistent values stop with one
`ConfigError` line naming the key (and the nearest valid key for a typo).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.resources
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field

import yaml

from .errors import ConfigError, JaxlmError
from .model.config import KV_DTYPES, ModelConfig, _choice, _positive, _section_type


@dataclass(frozen=True)
class DataConfig:
    _prefix = "data."

    # the training text: "stdlib", a directory, a text/.jsonl file or a `jaxlm prepare`
    # dir; sft/dpo/grpo: .jsonl files (paths, globs, comma-separated) or "stdlib-sft"
    corpus: str = "stdlib"
    max_docs: int = 0  # documents read from the corpus; 0: all
    eval_fraction: float = 0.02  # the share of documents / records held out for the eval loss
    seq_len: int = 256  # tokens per row (examples packed into rows)
    batch_size: int = 8  # rows per step, over all devices and processes
    seed: int = 0  # the order of the data (shuffling, the held-out split)
    shuffle_rows: int = 2048  # packed rows shuffled within windows of this many; 0: off
    # a tokenizer file; "": a `jaxlm prepare` corpus's or the run dir's, else a sentencepiece
    # model trained on the corpus (with train.init_from: the checkpoint's own)
    tokenizer: str = ""
    tokenizer_max_chars: int = 4_000_000  # characters of the corpus a tokenizer is trained on
    # sft/dpo chat records: "" the checkpoint's own template (else ChatML), "chatml", or a
    # .jinja file (see jaxlm.model.chat.resolve_chat_template)
    chat_template: str = ""
    # A weighted mixture, replacing `corpus` when given: [{path: ..., weight: ...}, ...]
    # in YAML, each path a corpus as above; a source's share of the rows is its weight.
    sources: tuple = ()

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size", "tokenizer_max_chars")
        object.__setattr__(self, "sources", _data_sources(self.sources))
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
        if self.max_docs < 0 or self.shuffle_rows < 0:
            raise ConfigError("data.max_docs and data.shuffle_rows must be >= 0")


def _data_sources(value) -> tuple:
    """data.sources as ((path, weight), ...) from a list of {path, weight} (or pairs)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"data.sources should be a list of {{path, weight}}, got {value!r}")
    out = []
    for i, s in enumerate(value):
        if isinstance(s, dict) and set(s) <= {"path", "weight"} and "path" in s:
            path, weight = s["path"], s.get("weight", 1.0)
        elif isinstance(s, (list, tuple)) and len(s) == 2:
            path, weight = s
        else:
            raise ConfigError(f"data.sources[{i}]={s!r} should be a mapping {{path, weight}}")
        if not isinstance(path, str) or not path or isinstance(weight, bool) \
                or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.sources[{i}]: path must be a non-empty string and weight a "
                              f"number > 0, got path={path!r}, weight={weight!r}")
        out.append((path, float(weight)))
    if out and not math.isfinite(sum(w for _, w in out)):
        raise ConfigError("data.sources: the weights must sum to a finite positive number")
    return tuple(out)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (jaxlm.train.lora): rank 0 = off. Adapters on the weights whose path
    ("layers/attn/q", "decoder/layers/cross/o", ...) re.fullmatch-es `targets`;
    scale alpha / rank (alpha 0: 2 * rank). base_dtype int8 | int4 | nf4 | fp8: the frozen
    base's layer matmul weights held quantized (QLoRA; 4-bit with double-quantized scales). init_from: a peft adapter dir the
    adapters start from (its r, lora_alpha and target_modules; `resolve_lora_from`)."""
    _prefix = "train.lora."

    rank: int = 0  # the adapters' rank; 0: LoRA off
    alpha: float = 0.0  # adapters scaled by alpha / rank; 0: 2 * rank
    targets: str = "layers/attn/(q|k|v|o)"  # regex re.fullmatch-ed against weight paths
    # the frozen base's layer matmul weights: same | int8 | int4 | nf4 | fp8 (QLoRA; 4-bit:
    # codes in groups of model.quant_group, their scales double-quantized, 8 bits per 256)
    base_dtype: str = "same"
    init_from: str = ""  # a peft LoRA adapter dir to continue (alias train.lora_from)

    def __post_init__(self):
        _choice(self, "base_dtype", ("same", "int8", "int4", "nf4", "fp8"))
        if self.rank < 0:
            raise ConfigError(f"train.lora.rank={self.rank} must be >= 0 (0: LoRA off)")
        if self.alpha < 0:
            raise ConfigError(f"train.lora.alpha={self.alpha} must be >= 0 (0: 2 * rank)")
        if self.base_dtype != "same" and not self.rank:
            raise ConfigError(f"train.lora.base_dtype={self.base_dtype} (QLoRA) needs "
                              "train.lora.rank > 0")
        if self.rank:
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ConfigError(f"train.lora.targets={self.targets!r} is not a valid "
                                  f"regular expression ({e})") from None


@dataclass(frozen=True)
class DpoConfig:
    """Paired preference losses (jaxlm.train.dpo, train.objective=dpo): DPO / IPO against a
    reference policy; ORPO (TRL's ORPOTrainer) and SimPO (TRL's CPOTrainer with
    loss_type=simpo) without one."""
    _prefix = "train.dpo."

    # sigmoid, ipo: the KL penalty's strength (larger keeps the policy nearer the
    # reference); orpo: lambda, the odds-ratio term's weight; simpo: the reward scale
    beta: float = 0.1
    # sigmoid (DPO) | ipo | orpo (odds ratio + chosen NLL, no reference) | simpo
    # (length-normalised margin with simpo_gamma, no reference)
    loss: str = "sigmoid"
    # the assumed share of flipped preference labels (cDPO; sigmoid and simpo only)
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # simpo: the target reward margin gamma (TRL's simpo_gamma)
    # simpo: the weight of the chosen responses' NLL added to the loss (TRL's cpo_alpha; 0:
    # SimPO as published, TRL's CPOConfig defaults to 1)
    cpo_alpha: float = 0.0

    def __post_init__(self):
        _choice(self, "loss", ("sigmoid", "ipo", "orpo", "simpo"))
        if not self.beta > 0:
            raise ConfigError(f"train.dpo.beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"train.dpo.label_smoothing={self.label_smoothing} must be in "
                              "[0, 0.5)")
        if self.label_smoothing and self.loss in ("ipo", "orpo"):
            raise ConfigError(f"train.dpo.label_smoothing applies to the sigmoid and simpo "
                              f"losses; loss={self.loss} has none (as in TRL)")
        if self.cpo_alpha < 0:
            raise ConfigError(f"train.dpo.cpo_alpha={self.cpo_alpha} must be >= 0")

    @property
    def reference_free(self) -> bool:
        """Whether the loss needs no reference policy (orpo, simpo): none is kept."""
        return self.loss in ("orpo", "simpo")


@dataclass(frozen=True)
class KtoConfig:
    """KTO (jaxlm.train.kto, train.objective=kto): Ethayarajh et al.'s loss on unpaired
    {"prompt", "completion", "label"} records, as TRL's KTOTrainer computes it."""
    _prefix = "train.kto."

    beta: float = 0.1  # the KL penalty's strength: larger keeps the policy nearer the reference
    desirable_weight: float = 1.0  # the loss weight of desirable (label true) completions
    undesirable_weight: float = 1.0  # the loss weight of undesirable (label false) completions

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"train.kto.beta={self.beta} must be > 0")
        if not (self.desirable_weight >= 0 and self.undesirable_weight >= 0):
            raise ConfigError("train.kto.desirable_weight and train.kto.undesirable_weight "
                              "must be >= 0")


@dataclass(frozen=True)
class RewardConfig:
    """Reward models (jaxlm.train.reward, train.objective=reward): the Bradley-Terry loss
    -log sigmoid(r(x, y_w) - r(x, y_l) - margin) over a one-score head, as TRL's
    RewardTrainer."""
    _prefix = "train.reward."

    # adds this times mean((r_w + r_l)^2), keeping rewards centred on 0 (TRL's
    # center_rewards_coefficient); 0: off
    center_rewards_coefficient: float = 0.0

    def __post_init__(self):
        if not self.center_rewards_coefficient >= 0:
            raise ConfigError(f"train.reward.center_rewards_coefficient="
                              f"{self.center_rewards_coefficient} must be >= 0")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation (jaxlm.train.distill, train.objective=distill): the student matches a
    frozen teacher's next-token distributions on the loss tokens; TRL GKD's names."""
    _prefix = "train.distill."

    # the teacher: a jaxlm run dir or a Hugging Face dir with the student's vocabulary
    teacher: str = ""
    # forward_kl: KL(teacher || student) | reverse_kl: KL(student || teacher) | jsd: GKD's
    # generalized Jensen-Shannon divergence, interpolated by beta
    loss: str = "forward_kl"
    # jsd: the mixture's teacher weight, beta p_T + (1 - beta) p_S (TRL GKD's beta); 0 is
    # forward KL, 1 reverse KL
    beta: float = 0.5
    temperature: float = 1.0  # both sides' logits divided by it (and the on-policy sampling)
    # On-policy share (TRL GKD's lmbda): with this probability per step, keyed by train.seed
    # and the step, the batch's completions are the student's own samples (the engine over
    # the live params); 0: always the data's completions
    on_policy: float = 0.0
    alpha: float = 0.0  # the hard-label cross-entropy's weight: (1 - alpha) distill + alpha CE

    def __post_init__(self):
        _choice(self, "loss", ("forward_kl", "reverse_kl", "jsd"))
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"train.distill.beta={self.beta} must be in [0, 1]")
        if not self.temperature > 0:
            raise ConfigError(f"train.distill.temperature={self.temperature} must be > 0")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ConfigError(f"train.distill.on_policy={self.on_policy} must be in [0, 1]")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"train.distill.alpha={self.alpha} must be in [0, 1]")

    @property
    def jsd_beta(self) -> float:
        """The GKD beta the loss runs with: 0 forward KL, 1 reverse KL, else beta."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.loss, self.beta)


@dataclass(frozen=True)
class GrpoConfig:
    """GRPO (jaxlm.train.grpo, train.objective=grpo): TRL's GRPOTrainer keys. Each step
    samples num_generations completions per prompt with the engine, over the training
    params in place, scores them, and runs num_iterations updates on that rollout."""
    _prefix = "train.grpo."

    num_generations: int = 8  # G: completions sampled per prompt (data.batch_size counts them)
    beta: float = 0.0  # the KL (k3) penalty to the reference; 0: no reference kept (as TRL)
    epsilon: float = 0.2  # the clipped surrogate's lower bound 1 - epsilon on the ratio
    epsilon_high: float = 0.0  # its upper bound 1 + epsilon_high (DAPO); 0: epsilon
    # how per-token losses become the loss: grpo (each completion's token mean, then the
    # mean over completions) | bnpo / dapo (the mean over all completion tokens) |
    # dr_grpo (the sum over completion tokens / (completions x max_completion_length))
    loss_type: str = "dapo"
    num_iterations: int = 1  # mu: optimizer steps on each rollout (ratios to its log-probs)
    max_completion_length: int = 64  # tokens sampled per completion, at most
    temperature: float = 1.0  # the rollouts' sampling temperature (log-probs use it too)
    # Reward functions, comma-separated: module:function (called with prompts=,
    # completions= and each other JSONL field as a list; returns one float per
    # completion), exact:FIELD (1 if the completion's stripped text equals the row's
    # FIELD), regex:PATTERN (1 if the completion re.search-es PATTERN), model:PATH (a
    # sequence classifier's score of prompt + completion, jaxlm.classify), python (1 if
    # the prompt's text + the completion parse as Python and it adds a statement)
    reward_funcs: str = ""
    reward_weights: tuple = ()  # one weight per reward function; (): 1 each
    # advantages divided by the std of the group's rewards (group), of the batch's
    # (batch), or not at all (none: Dr. GRPO)
    scale_rewards: str = "group"

    def __post_init__(self):
        _choice(self, "loss_type", ("grpo", "bnpo", "dapo", "dr_grpo"))
        _choice(self, "scale_rewards", ("group", "batch", "none"))
        _positive(self, "num_iterations", "max_completion_length")
        if self.num_generations < 2:
            raise ConfigError(f"train.grpo.num_generations={self.num_generations} must be >= 2: "
                              "GRPO's advantage compares completions of one prompt")
        if self.beta < 0 or self.epsilon <= 0 or self.epsilon_high < 0:
            raise ConfigError("train.grpo: beta >= 0, epsilon > 0 and epsilon_high >= 0 "
                              "are required")
        if not self.temperature > 0:
            raise ConfigError(f"train.grpo.temperature={self.temperature} must be > 0 "
                              "(rollouts sample)")
        weights = self.reward_weights
        weights = [weights] if isinstance(weights, (int, float)) else weights
        if not isinstance(weights, (list, tuple)) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise ConfigError(f"train.grpo.reward_weights={self.reward_weights!r} must be a "
                              "list of numbers")
        object.__setattr__(self, "reward_weights", tuple(float(w) for w in weights))

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon_high or self.epsilon


@dataclass(frozen=True)
class PpoConfig:
    """PPO (jaxlm.train.ppo, train.objective=ppo): RLHF as InstructGPT and TRL's PPOTrainer
    (v0.12-0.19) run it; TRL's PPOConfig names. Each rollout samples one completion per
    prompt with the engine (GRPO's rollouts), scores it with a frozen reward model, and
    runs num_ppo_epochs updates of the policy and a value model on it."""
    _prefix = "train.ppo."

    # the reward model: a jaxlm reward run dir (train.objective=reward) or a Hugging Face
    # *ForSequenceClassification dir with one score and the policy's vocabulary (required)
    reward_model_path: str = ""
    # the value model's start: reward (the reward model's backbone and score head, as
    # TRL) | policy (the policy's backbone with a zero score head)
    value_init: str = "reward"
    num_ppo_epochs: int = 4  # optimizer steps on each rollout (ratios to its log-probs)
    kl_coef: float = 0.05  # the per-token KL penalty's weight in the rewards
    kl_estimator: str = "k1"  # the KL penalty per token: k1 (logp - ref) | k3 (TRL's option)
    cliprange: float = 0.2  # the policy ratio clipped to [1 - cliprange, 1 + cliprange]
    vf_coef: float = 0.1  # the value loss's weight: loss = pg_loss + vf_coef * vf_loss
    # the new values clipped to the rollout's values +- this in the value loss
    cliprange_value: float = 0.2
    gamma: float = 1.0  # GAE's discount
    lam: float = 0.95  # GAE's lambda
    whiten_rewards: bool = False  # whiten the per-token rewards over the batch before GAE
    # subtracted from the reward model's score of a completion without an EOS token; 0: off
    missing_eos_penalty: float = 0.0
    # tokens sampled per completion, at most (TRL's response_length)
    max_completion_length: int = 64
    temperature: float = 0.7  # the rollouts' sampling temperature (log-probs use it too)

    def __post_init__(self):
        _choice(self, "value_init", ("reward", "policy"))
        _choice(self, "kl_estimator", ("k1", "k3"))
        _positive(self, "num_ppo_epochs", "max_completion_length")
        if not (self.cliprange > 0 and self.cliprange_value > 0):
            raise ConfigError("train.ppo: cliprange > 0 and cliprange_value > 0 are required")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.missing_eos_penalty < 0:
            raise ConfigError("train.ppo: kl_coef, vf_coef and missing_eos_penalty must be >= 0")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"train.ppo: gamma={self.gamma} and lam={self.lam} must be in "
                              "[0, 1]")
        if not self.temperature > 0:
            raise ConfigError(f"train.ppo.temperature={self.temperature} must be > 0 "
                              "(rollouts sample)")


@dataclass(frozen=True)
class TrainConfig:
    _prefix = "train."

    steps: int = 1000  # optimizer steps: the run ends at this step
    learning_rate: float = 3e-4  # the peak, reached after warmup; then cosine decay
    warmup_steps: int = 100  # linear warmup from 0 to learning_rate
    min_lr_ratio: float = 0.1  # the learning rate at train.steps, as a fraction of the peak
    weight_decay: float = 0.1  # AdamW's (decoupled) weight decay
    b1: float = 0.9  # AdamW's first-moment decay
    b2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float = 1.0  # the gradients' global norm clipped to this; 0: off
    eval_every: int = 100  # steps between eval-loss measurements
    eval_batches: int = 4  # held-out batches per eval
    # lm-eval tasks run on the training params at every eval_every (jaxlm's lm-eval
    # backend, the `eval` extra), logged as eval_<task>/<metric>: a list of task names
    eval_tasks: tuple = ()
    eval_task_path: str = ""  # a directory of lm-eval task YAMLs (local tasks) for eval_tasks
    eval_task_limit: int = 0  # items per task at each eval_tasks run (0: all of them)
    checkpoint_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 3  # checkpoints kept (the latest)
    log_every: int = 10  # steps between metrics.jsonl / progress-bar updates
    seed: int = 0  # initial weights, dropout and masking (mlm, span), keyed by step
    # Cross-entropy over vocab chunks of about this many columns, never
    # materialising [batch, seq, vocab] logits; 0: plain full logits.
    loss_vocab_chunk: int = 4096
    # the loss: clm (next token) | mlm (masked LM) | span (T5 span corruption) | sft | dpo
    # (train.dpo.loss: also orpo, simpo) | kto (unpaired labelled completions) | classify (a
    # score head's cross-entropy over labelled texts; MSE for num_labels=1) | reward (a
    # Bradley-Terry reward model on preference pairs; from a causal LM: a fresh score head)
    # | distill (match train.distill.teacher's distributions; SFT JSONL or raw text data)
    # | grpo (rollouts by the engine, scored by reward functions: train.grpo) | ppo
    # (rollouts scored by a reward model, a value model trained beside: train.ppo)
    objective: str = "clm"
    # A jaxlm run/checkpoint dir or a Hugging Face dir to start from: the model
    # config, weights and tokenizer come from it ("": random init; `resolve_init_from`)
    init_from: str = ""
    mlm_probability: float = 0.15  # mlm: tokens chosen; of them 80% [MASK], 10% random, 10% kept
    span_noise_density: float = 0.15  # span: fraction of tokens corrupted
    span_mean_length: float = 3.0  # span: mean corrupted span length
    sft_loss_on: str = "completion"  # sft: the loss on completion / assistant tokens | all
    # model.mtp_depth > 0 (clm, sft): DeepSeek-V3's lambda, the weight of the multi-token
    # prediction loss (the mean over depths of module k's cross-entropy on token t+1+k,
    # logged as mtp_loss, weighted) added to the objective; 0: the modules are not trained
    mtp_loss_weight: float = 0.3
    # Per-device peak FLOP/s that MFU divides by; 0: the datasheet bf16 figure
    # for a known accelerator (train/metrics.py), else the measured matmul peak.
    peak_flops: float = 0.0
    tensorboard: bool = True  # write TensorBoard event files in run_dir beside metrics.jsonl
    # A step whose loss, gradient or update is not finite is skipped on device
    # (params and optimizer state unchanged); this many in a row stop the run.
    max_skipped_steps: int = 10
    # Gradient accumulation: the batch runs as this many microbatches inside one step.
    grad_accum_steps: int = 1
    lora: LoraConfig = field(default_factory=LoraConfig)  # lora.rank 0: off
    dpo: DpoConfig = field(default_factory=DpoConfig)  # train.objective=dpo
    kto: KtoConfig = field(default_factory=KtoConfig)  # train.objective=kto
    reward: RewardConfig = field(default_factory=RewardConfig)  # train.objective=reward
    distill: DistillConfig = field(default_factory=DistillConfig)  # train.objective=distill
    grpo: GrpoConfig = field(default_factory=GrpoConfig)  # train.objective=grpo
    ppo: PpoConfig = field(default_factory=PpoConfig)  # train.objective=ppo
    # Pipeline parallelism (mesh.stage > 1): microbatches per step flowing through
    # the stages (GPipe); 0: one per stage. Bubble (S-1)/(R*M+S-1).
    pipeline_microbatches: int = 0

    def __post_init__(self):
        _section_type(self, "lora", LoraConfig)
        _section_type(self, "dpo", DpoConfig)
        _section_type(self, "kto", KtoConfig)
        _section_type(self, "reward", RewardConfig)
        _section_type(self, "distill", DistillConfig)
        _section_type(self, "grpo", GrpoConfig)
        _section_type(self, "ppo", PpoConfig)
        tasks = [self.eval_tasks] if isinstance(self.eval_tasks, str) else self.eval_tasks
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t.strip()
                                                             for t in tasks):
            raise ConfigError(f"train.eval_tasks={self.eval_tasks!r} must be a list of lm-eval "
                              "task names")
        object.__setattr__(self, "eval_tasks", tuple(t.strip() for t in tasks))
        if self.eval_task_limit < 0:
            raise ConfigError(f"train.eval_task_limit={self.eval_task_limit} must be >= 0")
        _positive(self, "steps", "learning_rate", "eval_every", "eval_batches",
                  "checkpoint_every", "keep_checkpoints", "log_every", "max_skipped_steps")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ConfigError(
                f"train.warmup_steps={self.warmup_steps} must be in [0, train.steps={self.steps}]")
        if self.mtp_loss_weight < 0:
            raise ConfigError(f"train.mtp_loss_weight={self.mtp_loss_weight} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.objective in ("orpo", "simpo", "ipo"):  # TRL trainers of their own; here losses
            raise ConfigError(f"train.objective={self.objective} is a preference loss here: "
                              f"train.objective=dpo train.dpo.loss={self.objective}")
        _choice(self, "objective", ("clm", "mlm", "span", "sft", "dpo", "kto", "classify",
                                    "reward", "distill", "grpo", "ppo"))
        _choice(self, "sft_loss_on", ("completion", "all"))
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if not (0 < self.mlm_probability < 1 and 0 < self.span_noise_density < 1
                and self.span_mean_length >= 1):
            raise ConfigError("train: 0 < mlm_probability < 1, 0 < span_noise_density < 1 and "
                              "span_mean_length >= 1 are required")
        if self.loss_vocab_chunk < 0:
            raise ConfigError(f"train.loss_vocab_chunk={self.loss_vocab_chunk} must be >= 0")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be >= 0")
        if not self.peak_flops >= 0:
            raise ConfigError(f"train.peak_flops={self.peak_flops} must be >= 0 (0: automatic)")


# Logical axis -> mesh axis (or None: replicated). Changing parallelism is
# changing this table and the mesh sizes, never model code.
# The batch is split over data, fsdp and expert: outside the MoE layers the
# expert axis is one more data-parallel axis (GShard / Switch layout).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", "context"),  # context parallelism: ring attention (model/kernels/ring.py)
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", "stage"),  # pipeline parallelism: contiguous stages (sharding/pipeline.py)
    ("experts", "expert"),
)

# Outer to inner: tensor is the fastest. context sits inside data and fsdp
# (its ring moves K/V every layer, more often than their per-step / per-layer
# collectives) and outside expert and tensor (whose all-to-all / all-reduce
# per matmul need the fastest links); the ring only talks to neighbours.
# stage is outermost: a pipeline sends one activation per microbatch to its
# neighbour, the least traffic of all (across hosts / slices).
MESH_AXES = ("stage", "data", "fsdp", "context", "expert", "tensor")


@dataclass(frozen=True)
class MeshConfig:
    _prefix = "mesh."

    data: int = -1  # data parallelism: devices the batch is split over; -1: all left
    fsdp: int = 1  # devices the weights, optimizer state (and the batch) are split over
    tensor: int = 1  # devices heads, MLP and vocab columns are split over (tensor parallel)
    expert: int = 1  # MoE experts split over this axis (and the batch, outside MoE layers)
    context: int = 1  # the sequence split over this axis: ring attention, causal load balancing
    stage: int = 1  # pipeline stages: the layer stack split over this axis (sharding/pipeline.py)
    # > 1: each stage holds this many round-robin blocks of layers (circular schedule)
    pipeline_repeats: int = 1

    # Cross-host (DCN) factors: mesh axis X has mesh.X devices in all, of which
    # dcn_X across slices/hosts (the rest within one). All 1: a single slice.

    dcn_data: int = 1  # of mesh.data, the factor across slices / hosts (DCN)
    dcn_fsdp: int = 1  # of mesh.fsdp, the factor across slices / hosts (DCN)
    dcn_tensor: int = 1  # of mesh.tensor, the factor across slices / hosts (DCN)
    dcn_expert: int = 1  # of mesh.expert, the factor across slices / hosts (DCN)
    dcn_context: int = 1  # of mesh.context, the factor across slices / hosts (DCN)
    dcn_stage: int = 1  # of mesh.stage, the factor across slices / hosts (DCN)
    devices: int = 0  # 0: every device; N: only the first N (single-process runs)
    # logical axis (batch, embed, heads, ...) -> mesh axes (null: replicated): where
    # every weight, activation and cache is split
    rules: tuple = DEFAULT_RULES

    def __post_init__(self):
        if self.devices < 0:
            raise ConfigError(f"mesh.devices={self.devices} must be >= 0 (0: all devices)")
        sizes = self.sizes
        if sum(1 for v in sizes.values() if v == -1) > 1:
            raise ConfigError("mesh: at most one axis may be -1")
        if self.pipeline_repeats < 1 or (self.pipeline_repeats > 1 and self.stage == 1):
            raise ConfigError(f"mesh.pipeline_repeats={self.pipeline_repeats} must be >= 1, "
                              "and needs mesh.stage > 1 when above 1")
        for name, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{name}={v} must be a positive size or -1")
            dcn = getattr(self, f"dcn_{name}")
            if dcn < 1:
                raise ConfigError(f"mesh.dcn_{name}={dcn} must be >= 1")
            if v != -1 and v % dcn:
                raise ConfigError(f"mesh.dcn_{name}={dcn} does not divide mesh.{name}={v}")
        rules = tuple((str(k), _mesh_axes(v)) for k, v in (
            self.rules.items() if isinstance(self.rules, dict) else self.rules))
        for logical, axes in rules:
            for a in axes or ():
                if a not in sizes:
                    raise ConfigError(
                        f"mesh.rules.{logical}: unknown mesh axis {a!r} "
                        f"(valid: {', '.join(sizes)})")
        object.__setattr__(self, "rules", rules)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return MESH_AXES

    @property
    def sizes(self) -> dict[str, int]:
        """Configured size per mesh axis (-1: takes the rest), in mesh order."""
        return {a: getattr(self, a) for a in MESH_AXES}

    @property
    def dcn_sizes(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}") for a in MESH_AXES}


def _mesh_axes(v):
    if v is None:
        return None
    if isinstance(v, str):
        return (v,)
    return tuple(v)


@dataclass(frozen=True)
class GenerateConfig:
    """The one decoding-settings value: `jaxlm.generate`'s keyword arguments, the
    generate.* config keys, batch-infer's per-row keys and each engine request's
    settings (`jaxlm.infer.engine`) are its fields."""
    _prefix = "generate."

    max_new_tokens: int = 64  # tokens generated per sequence, at most
    temperature: float = 0.0  # the sampling temperature; 0: greedy
    top_k: int = 0  # sample among the k most likely tokens; 0: off
    top_p: float = 1.0  # sample among the most likely tokens holding this probability; 1: off
    seed: int = 0  # the sampling seed

    # logit processors (HF semantics, see jaxlm.infer.processors) and min-p

    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0: off
    # penalise tokens of the prompt and the output (HF: logits > 0 divided by it, < 0
    # multiplied); 1: off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # minus this on tokens generated so far (OpenAI); 0: off
    frequency_penalty: float = 0.0  # minus this x each token's count so far (OpenAI); 0: off
    no_repeat_ngram_size: int = 0  # no n-gram of this size twice in prompt + output; 0: off
    min_new_tokens: int = 0  # stop ids masked before this many new tokens
    stop_ids: tuple = ()  # token ids that stop a row, besides the tokenizer's EOS
    stop: tuple = ()  # stop strings: a row ends once its text holds one (not returned)

    # beam search (greedy only), HF semantics

    num_beams: int = 1  # beams per prompt; 1: no beam search
    length_penalty: float = 1.0  # beams: a finished beam's score is divided by length ** this
    # beams: stop once num_beams are done (true), once a better one is unlikely (false:
    # HF's heuristic), or once none can come (never)
    early_stopping: typing.Union[bool, str] = False
    num_return_sequences: int = 1  # sequences per prompt: samples, or the best beams
    # KV cache: auto (the model's dtype), int8, int4 (2 per byte) or fp8 (E4M3), each
    # quantized with a float32 scale per token and KV head
    kv_dtype: str = "auto"
    # reuse the KV pages of prompt prefixes already in a paged engine's pool (a hash
    # chain over full pages; the outputs are the same either way)
    prefix_cache: bool = True

    def __post_init__(self):
        _choice(self, "kv_dtype", KV_DTYPES)
        _positive(self, "max_new_tokens", "num_beams", "num_return_sequences",
                  "repetition_penalty")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                "generate: temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"generate.min_p={self.min_p} must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"generate.{name}={getattr(self, name)} must be in [-2, 2]")
        for name in ("no_repeat_ngram_size", "min_new_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"generate.{name}={getattr(self, name)} must be >= 0")
        stop = self.stop_ids
        stop = [stop] if isinstance(stop, int) and not isinstance(stop, bool) else stop
        if not isinstance(stop, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop):
            raise ConfigError(f"generate.stop_ids={self.stop_ids!r} must be a list of "
                              "token ids >= 0")
        object.__setattr__(self, "stop_ids", tuple(stop))
        strings = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(strings, (list, tuple)) or not all(
                isinstance(s, str) and s for s in strings):
            raise ConfigError(f"generate.stop={self.stop!r} must be a string or a list of "
                              "non-empty strings")
        object.__setattr__(self, "stop", tuple(strings))
        if not (self.early_stopping is True or self.early_stopping is False
                or self.early_stopping == "never"):
            raise ConfigError(f"generate.early_stopping={self.early_stopping!r} must be "
                              "true, false or never")
        if self.num_beams > 1 and self.temperature > 0:
            raise ConfigError(f"generate.num_beams={self.num_beams} with temperature="
                              f"{self.temperature}: sampling with beams is not supported; "
                              "set generate.temperature=0")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(f"generate.num_return_sequences={self.num_return_sequences} "
                              f"must be <= generate.num_beams={self.num_beams}")


@dataclass(frozen=True)
class ServeConfig:
    """`jaxlm serve`: the engine behind the server and what its compiled loop runs
    (requests needing a feature switched off get a 400 naming the key)."""
    _prefix = "serve."

    slots: int = 16  # sequences decoded together (a request with n samples takes n)
    max_queue: int = 64  # requests waiting for a slot, at most; beyond: 429 with Retry-After
    max_tokens: int = 256  # the largest max_tokens a request may ask (the engine's buffers)
    page_size: int = 16  # tokens per KV page
    n_pages: int = 0  # KV pages in the pool; 0: enough for every slot's longest request
    steps_per_call: int = 8  # decode steps per device round trip (streamed tokens come this often)
    # what the compiled loop runs (false: requests asking for it get a 400)

    sampling: bool = True  # temperature > 0 with top_k / top_p / min_p (false: greedy only)
    max_top_k: int = 64  # the largest top_k a request may ask (candidates the sampler keeps)
    penalties: bool = True  # repetition, presence and frequency penalties
    guided: bool = True  # response_format json_object / json_schema (guided decoding)
    max_logprobs: int = 5  # the most top log-probs a request may ask; -1: no log-probs at all
    grace_seconds: float = 30.0  # SIGTERM: in-flight requests finish or are cancelled by then

    def __post_init__(self):
        _positive(self, "slots", "max_tokens", "page_size", "steps_per_call")
        for name in ("max_queue", "n_pages", "max_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"serve.{name}={getattr(self, name)} must be >= 0")
        if self.max_logprobs < -1 or self.max_logprobs > 20:
            raise ConfigError(f"serve.max_logprobs={self.max_logprobs} must be in [-1, 20]")
        if self.grace_seconds < 0:
            raise ConfigError(f"serve.grace_seconds={self.grace_seconds} must be >= 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    run_dir: str = "runs/default"  # the run's directory: config.yaml, checkpoints, metrics

    def __post_init__(self):
        if self.data.batch_size % self.train.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps={self.train.grad_accum_steps} does not "
                              f"divide data.batch_size={self.data.batch_size}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is longer than "
                f"model.max_seq_len={self.model.max_seq_len}")
        if self.train.objective in ("dpo", "kto") and self.model.family != "decoder":
            raise ConfigError(f"train.objective={self.train.objective} needs model.family="
                              f"decoder, not {self.model.family!r}")
        _check_classify(self)
        _check_distill(self)
        _check_grpo(self)
        if self.train.lora.rank:  # a regex that adapts nothing stops here, naming itself
            from .train.lora import lora_targets
            lora_targets(self.model, self.train)
        context = self.mesh.context
        if context > 1:
            if self.data.seq_len % (2 * context):
                raise ConfigError(
                    f"data.seq_len={self.data.seq_len} must divide by 2 x mesh.context="
                    f"{2 * context} (causal load balancing splits it into 2 x context chunks)")
            if self.model.positions in ("alibi", "t5_relative"):
                raise ConfigError(
                    f"model.positions={self.model.positions!r} (an attention bias) is not "
                    "supported under context parallelism (mesh.context > 1)")
            if self.model.family != "decoder":
                raise ConfigError(
                    f"mesh.context={context}: context parallelism supports model.family="
                    f"'decoder' only, not {self.model.family!r}")
        from .sharding.pipeline import check_pipeline_config
        check_pipeline_config(self)


def _check_grpo(cfg: Config) -> None:
    """What train.objective=grpo | ppo (rollouts by the engine) need of the rest of the
    config. (PPO's reward model is checked when training starts, `train.ppo.check_ppo`:
    a preset names none, and it reads the model's config.)"""
    objective = cfg.train.objective
    if objective not in ("grpo", "ppo"):
        return
    section = f"train.{objective}"
    length = getattr(cfg.train, objective).max_completion_length
    if cfg.model.family != "decoder":
        raise ConfigError(f"train.objective={objective} needs model.family=decoder, not "
                          f"{cfg.model.family!r}")
    g = cfg.train.grpo
    if objective == "grpo" and cfg.data.batch_size % g.num_generations:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (completions per step) must be "
                          f"a multiple of train.grpo.num_generations={g.num_generations}")
    if length >= cfg.data.seq_len:
        raise ConfigError(f"{section}.max_completion_length={length} must be "
                          f"less than data.seq_len={cfg.data.seq_len} (prompt + completion)")
    if cfg.mesh.context > 1 or cfg.mesh.stage > 1:
        raise ConfigError(f"train.objective={objective} runs rollouts with the engine: "
                          "mesh.context and mesh.stage must be 1")


def _check_classify(cfg: Config) -> None:
    """What train.objective=classify | reward do not support. (Whether the model has the score
    head it trains is checked when training starts, `train.objectives.check_objective`:
    a preset names no model, and a classifier's Config with the default objective is
    fine for saving and loading.)"""
    objective = cfg.train.objective
    if objective not in ("classify", "reward"):
        return
    if cfg.train.lora.rank:
        raise ConfigError(f"train.objective={objective} with train.lora.rank > 0 is not "
                          "supported: LoRA adapts layer weights only, and the score head would "
                          "stay frozen")
    if cfg.mesh.context > 1:
        raise ConfigError(f"train.objective={objective} with mesh.context={cfg.mesh.context} is "
                          "not supported (a row's score is pooled from one position)")


def _check_distill(cfg: Config) -> None:
    """What train.objective=distill does not support. (The teacher is checked when training
    starts, `train.distill.check_teacher`: a preset names none, and it reads the teacher.)"""
    if cfg.train.objective != "distill":
        return
    if cfg.model.family != "decoder":
        raise ConfigError(f"train.objective=distill needs model.family=decoder, not "
                          f"{cfg.model.family!r}")
    if cfg.train.lora.rank:
        raise ConfigError("train.objective=distill with train.lora.rank > 0 is not supported "
                          "yet: the state holds one frozen tree, here the teacher")
    if cfg.mesh.stage > 1:
        raise ConfigError(f"train.objective=distill with mesh.stage={cfg.mesh.stage} is not "
                          "supported (the teacher runs outside the pipeline)")


# ---------------------------------------------------------------- loading

# Old flat keys -> their nested paths, from when the groups one layer or loss
# consumes became sections. Applied wherever a config mapping is read (YAML
# files, a run's saved config.yaml, `key=value` overrides, model_config_from_dict,
# resolve_init_from's explicit model keys), so old run dirs and commands load;
# `to_dict` writes the nested form. A key moved into a section adds its old name here
# (tests/test_config.py checks that every nested key has one).
ALIASES = {
    "model.rope_theta": "model.rope.theta",
    "model.rope_scaling": "model.rope.scaling",
    "model.rope_scaling_factor": "model.rope.factor",
    "model.rope_low_freq_factor": "model.rope.low_freq_factor",
    "model.rope_high_freq_factor": "model.rope.high_freq_factor",
    "model.rope_original_max_len": "model.rope.original_max_len",
    "model.rope_attention_factor": "model.rope.attention_factor",
    "model.rope_yarn_beta_fast": "model.rope.yarn.beta_fast",
    "model.rope_yarn_beta_slow": "model.rope.yarn.beta_slow",
    "model.rope_yarn_mscale": "model.rope.yarn.mscale",
    "model.rope_yarn_mscale_all_dim": "model.rope.yarn.mscale_all_dim",
    "model.rope_yarn_truncate": "model.rope.yarn.truncate",
    "model.n_experts": "model.moe.n_experts",
    "model.experts_per_token": "model.moe.experts_per_token",
    "model.moe_capacity_factor": "model.moe.capacity_factor",
    "model.router_aux_loss_coef": "model.moe.aux_loss_coef",
    "model.router_z_loss_coef": "model.moe.z_loss_coef",
    "train.lora_rank": "train.lora.rank",
    "train.lora_alpha": "train.lora.alpha",
    "train.lora_targets": "train.lora.targets",
    "train.lora_base_dtype": "train.lora.base_dtype",
    "train.lora_from": "train.lora.init_from",
    "train.dpo_beta": "train.dpo.beta",
    "train.dpo_loss": "train.dpo.loss",
    "train.dpo_label_smoothing": "train.dpo.label_smoothing",
    # TRL's flat names (DPOConfig / CPOConfig / KTOConfig / RewardConfig)
    "train.simpo_gamma": "train.dpo.simpo_gamma",
    "train.cpo_alpha": "train.dpo.cpo_alpha",
    "train.desirable_weight": "train.kto.desirable_weight",
    "train.undesirable_weight": "train.kto.undesirable_weight",
    "train.kto_beta": "train.kto.beta",
    "train.center_rewards_coefficient": "train.reward.center_rewards_coefficient",
    # TRL's flat spellings (GKDConfig), short names rather than old ones
    "train.lmbda": "train.distill.on_policy",
    "train.teacher_model_name_or_path": "train.distill.teacher",
    # TRL's GRPOConfig spellings, flat (short names, not old ones); beta, loss_type and
    # temperature mean other things in other objectives: grpo_ in front
    "train.num_generations": "train.grpo.num_generations",
    "train.grpo_beta": "train.grpo.beta",
    "train.epsilon": "train.grpo.epsilon",
    "train.epsilon_high": "train.grpo.epsilon_high",
    "train.grpo_loss_type": "train.grpo.loss_type",
    "train.num_iterations": "train.grpo.num_iterations",
    "train.max_completion_length": "train.grpo.max_completion_length",
    "train.grpo_temperature": "train.grpo.temperature",
    "train.reward_funcs": "train.grpo.reward_funcs",
    "train.reward_weights": "train.grpo.reward_weights",
    "train.scale_rewards": "train.grpo.scale_rewards",
    # TRL's PPOConfig spellings, flat (response_length is its max_completion_length;
    # temperature means other things in other objectives: ppo_ in front)
    "train.reward_model_path": "train.ppo.reward_model_path",
    "train.value_init": "train.ppo.value_init",
    "train.num_ppo_epochs": "train.ppo.num_ppo_epochs",
    "train.kl_coef": "train.ppo.kl_coef",
    "train.kl_estimator": "train.ppo.kl_estimator",
    "train.cliprange": "train.ppo.cliprange",
    "train.vf_coef": "train.ppo.vf_coef",
    "train.cliprange_value": "train.ppo.cliprange_value",
    "train.gamma": "train.ppo.gamma",
    "train.lam": "train.ppo.lam",
    "train.whiten_rewards": "train.ppo.whiten_rewards",
    "train.missing_eos_penalty": "train.ppo.missing_eos_penalty",
    "train.response_length": "train.ppo.max_completion_length",
    "train.ppo_temperature": "train.ppo.temperature",
}


def canonical_key(key: str) -> str:
    """The current dotted path of a key (an old flat name -> its nested path)."""
    return ALIASES.get(key, key)


def resolve_aliases(node: dict, prefix: str = "") -> dict:
    """A copy of `node`, the config mapping at `prefix` ("" for a whole config,
    "model." for a model section), with every old flat key moved to its nested
    path. The old and the new name of one key with different values: ConfigError."""
    out, moved = {}, []
    for key, value in node.items():
        path = prefix + str(key)
        if path in ALIASES:
            moved.append((path, value))
        else:
            out[key] = resolve_aliases(value, path + ".") if isinstance(value, dict) else value
    for old, value in moved:
        new = ALIASES[old]
        *sections, leaf = new[len(prefix):].split(".")
        target = out
        for name in sections:
            if target.get(name) is None:
                target[name] = {}
            elif not isinstance(target[name], dict):
                raise ConfigError(f"{old} belongs in section {new.rsplit('.', 1)[0]}, but "
                                  f"{prefix}{name}={target[name]!r} is a value")
            target = target[name]
        if leaf in target and target[leaf] != value:
            raise ConfigError(f"{old}={value!r} and {new}={target[leaf]!r} are the old and the "
                              f"new name of one key: give one")
        target[leaf] = value
    return out

def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(path: str, value) -> ConfigError:
    while isinstance(value, dict) and len(value) == 1:  # name the full key: trian.steps
        (key, value), = value.items()
        path = f"{path}.{key}"
    candidates = _all_keys(Config)
    hint = difflib.get_close_matches(path, candidates, n=1, cutoff=0.5)
    return ConfigError(f"unknown config key {path!r}"
                       + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _coerce(value, typ, path):
    """Coerce a YAML/CLI value to the field's type, or raise a ConfigError."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is tuple or origin is tuple:
        if isinstance(value, (list, tuple, dict)):
            return value
    else:
        return value
    raise ConfigError(f"{path}={value!r} should be of type {getattr(typ, '__name__', typ)}")


def _build(cls, data: dict, prefix=""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} should be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = prefix + str(key)
        if key not in names:
            raise _unknown_key(path, value)
        t = hints[key]
        if dataclasses.is_dataclass(t):
            kwargs[key] = _build(t, value or {}, path + ".")
        else:
            kwargs[key] = _coerce(value, t, path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a value of a type the dataclass refuses
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _deep_set(tree: dict, path: str, value):
    parts = path.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:  # missing, or an empty section in YAML (`rope:`)
            node[p] = {}
        child = node[p]
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (1e-3, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} should look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def resolve_preset(name_or_path: str) -> str:
    """A YAML path, or a preset name shipped in jaxlm/configs (e.g. `tiny-llama`)."""
    if os.path.exists(name_or_path):
        return name_or_path
    name = os.path.basename(name_or_path)
    name = name if name.endswith(".yaml") else name + ".yaml"
    preset = importlib.resources.files("jaxlm.configs") / name
    if preset.is_file():
        return str(preset)
    known = sorted(p.name[:-5] for p in importlib.resources.files("jaxlm.configs").iterdir()
                   if p.name.endswith(".yaml"))
    hint = difflib.get_close_matches(name[:-5], known, n=1)
    raise ConfigError(f"config {name_or_path!r} not found: not a file, nor a preset ("
                      + ", ".join(known) + ")" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def apply_overrides(data: dict, overrides) -> dict:
    """A copy of the config mapping `data` with `a.b=value` overrides (or (key, value)
    pairs) set in it; old key names (ALIASES) in either become their nested paths.
    An override wins over the mapping, and a later override over an earlier one (a
    list composed of a base and its changes); two overrides naming one key by its old
    and its new name with different values are a ConfigError. (The command line
    refuses any key given twice: `refuse_repeated_keys`.)"""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections (model:, data:, ...), "
                          f"got a {type(data).__name__}")
    data = resolve_aliases(data)
    given = {}
    for text in _override_list(overrides):
        key, value = parse_override(text) if isinstance(text, str) else text
        path = canonical_key(key)
        if path in given and given[path][0] != key and given[path][1] != value:
            raise ConfigError(f"{given[path][0]}={given[path][1]!r} and {key}={value!r} are the "
                              "old and the new name of one key: give one")
        given[path] = (key, value)
        _deep_set(data, path, value)
    return resolve_aliases(data)  # a whole section set by an override may hold old names


def refuse_repeated_keys(overrides) -> None:
    """ConfigError naming a key that `key=value` overrides give twice (by one name, or by
    its old and its new name): on a command line neither silently wins."""
    given = {}
    for text in _override_list(overrides):
        key, value = parse_override(text) if isinstance(text, str) else text
        path = canonical_key(key)
        if path in given:
            first, was = given[path]
            raise ConfigError(
                f"{first}={was!r} and {key}={value!r} are the old and the new name of one "
                "key: give one" if first != key else
                f"{key} is given twice ({key}={was!r}, then {key}={value!r}): give it once")
        given[path] = (key, value)


def config_from_dict(data: dict, overrides=()) -> Config:
    return _build(Config, apply_overrides(data, overrides))


def resolve_init_from(data: dict, preset: str | None = None, user_keys=None) -> dict:
    """With `train.init_from=PATH`, the model section comes from that checkpoint.

    Keys the config gives explicitly under `model` are applied on top of the
    checkpoint's model config when they leave every parameter shape as it is
    (dtype, param_dtype, remat, attention_impl, ...); one that would change a
    shape (n_layers, d_model, vocab_size, ...) is a ConfigError naming it.
    Used for configs a user writes (`load_config`), not for a run's saved
    config.yaml, which holds the resolved model section already. `preset` and
    `user_keys` (the dotted keys the overrides set; None: all of them) say who set a
    key, so that a preset's model section is reported as the preset's.
    """
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict) \
            or not data["train"].get("init_from"):
        return data
    # absolute: the run dir's config.yaml and its exports name the base from anywhere
    path = os.path.abspath(os.path.expanduser(str(data["train"]["init_from"])))
    data = {**data, "train": {**data["train"], "init_from": path}}
    from .api import model_config_of  # reads config.yaml / config.json only
    from .model.families import model_specs
    from .model.params import abstract
    import jax

    base = reward_model_config(model_config_of(path), path, data["train"].get("objective"))
    shapes = lambda c: jax.tree.map(lambda s: s.shape, abstract(model_specs(c)))  # noqa: E731
    reference = shapes(base)
    explicit = data.get("model") or {}
    if not isinstance(explicit, dict):
        raise ConfigError(f"model should be a mapping, got {explicit!r}")
    for key, value in _leaves(ModelConfig, resolve_aliases(explicit, "model."), "model."):
        current = _get_path(base, key)
        if value == current:
            continue
        candidate = _replace_path(base, key, value)
        if shapes(candidate) != reference:
            given = user_keys is None or any(f"model.{key}" == k or f"model.{key}".startswith(
                k + ".") for k in user_keys)
            raise ConfigError(
                f"model.{key}={value!r} would change a parameter shape of the train.init_from "
                f"checkpoint {path} (it has {key}={current!r}); the model comes from "
                "the checkpoint: leave the key out" if given or preset is None else
                f"the config {preset} sets model.{key}={value!r}, which would change a "
                f"parameter shape of the train.init_from checkpoint {path} (it has "
                f"{key}={current!r}); the model comes from the checkpoint: start from a "
                "fine-tuning preset with no model section (--config sft or dpo)")
        base = candidate
    return {**data, "model": to_dict(base)}


def reward_model_config(base: ModelConfig, path: str, objective) -> ModelConfig:
    """The model a train.objective=reward run starts from `path` with: a sequence
    classifier (num_labels > 0) as it is; a causal LM with one fresh score in place of
    its LM head (TRL's RewardTrainer: AutoModelForSequenceClassification(num_labels=1)),
    pooled at the last token that is not the tokenizer's pad id. Other objectives: `base`."""
    if objective != "reward" or base.num_labels or base.family != "decoder":
        return base
    from .model.tokenizer import load_tokenizer
    try:
        pad = load_tokenizer(path).pad_id
    except JaxlmError:  # a dir without a tokenizer: no pad rule
        pad = -1
    return dataclasses.replace(base, num_labels=1, pad_token_id=pad, label_names=())


def _leaves(cls, data: dict, prefix: str):
    """(dotted key below prefix, value coerced to its field's type) for every leaf of
    `data`, a mapping of cls's fields (nested sections: nested mappings)."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        path = prefix + str(key)
        if key not in hints:
            raise _unknown_key(path, value)
        t = hints[key]
        if dataclasses.is_dataclass(t):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{path} should be a mapping, got {value!r}")
            for sub, v in _leaves(t, value, path + "."):
                yield f"{key}.{sub}", v
        else:
            yield str(key), _coerce(value, t, path)


def _get_path(cfg, dotted: str):
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _replace_path(cfg, dotted: str, value):
    """cfg with the field at `dotted` (e.g. "rope.yarn.beta_fast") set to value."""
    head, _, rest = dotted.partition(".")
    if rest:
        value = _replace_path(getattr(cfg, head), rest, value)
    return dataclasses.replace(cfg, **{head: value})


def _override_list(overrides) -> list:
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got a "
                          f"{type(overrides).__name__} {overrides!r:.60}"
                          + (f" (wrap it: [{overrides!r:.40}])" if isinstance(overrides, str)
                             else ""))
    return list(overrides)


def read_yaml(path) -> dict:
    """The mapping of a config file (a path or preset name), or a one-line ConfigError."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"config path must be a str (a YAML file or preset name), got "
                          f"{type(path).__name__}")
    path = resolve_preset(os.fspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, "
                          f"data:, ...), not a {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides=()) -> Config:
    """Load a preset (path or name) and apply `a.b=value` overrides."""
    overrides = _override_list(overrides)
    data = read_yaml(path) if path is not None and path != "" else {}
    user_keys = {canonical_key(parse_override(o)[0] if isinstance(o, str) else o[0])
                 for o in overrides}
    return _build(Config, _absolute_teacher(resolve_lora_from(resolve_init_from(
        apply_overrides(data, overrides), preset=path, user_keys=user_keys))))


def _absolute_teacher(data: dict) -> dict:
    """train.distill.teacher and train.ppo.reward_model_path as absolute paths (as
    train.init_from): the run dir's config.yaml names the model a resume reads again,
    from any directory."""
    train = data.get("train") if isinstance(data, dict) else None
    for name, key in (("distill", "teacher"), ("ppo", "reward_model_path")):
        section = train.get(name) if isinstance(train, dict) else None
        if not isinstance(section, dict) or not section.get(key):
            continue
        path = os.path.abspath(os.path.expanduser(str(section[key])))
        train = {**train, name: {**section, key: path}}
        data = {**data, "train": train}
    return data


def resolve_lora_from(data: dict) -> dict:
    """With `train.lora.init_from=ADAPTER_DIR` (alias train.lora_from), a peft LoRA
    adapter dir to continue: its r, lora_alpha and target_modules become train.lora's
    rank, alpha and targets; one the config sets otherwise is a ConfigError."""
    train = data.get("train") if isinstance(data, dict) else None
    lora = train.get("lora") if isinstance(train, dict) else None
    if not isinstance(lora, dict) or not lora.get("init_from"):
        return data
    path = os.path.abspath(os.path.expanduser(str(lora["init_from"])))
    if not train.get("init_from"):
        raise ConfigError(f"train.lora.init_from={path}: continuing a peft adapter needs its "
                          "base too: train.init_from=HF_DIR")
    from .model.peft import lora_settings, read_adapter_config
    from .errors import CheckpointError
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ConfigError(f"train.lora.init_from={path} is not a peft adapter dir (no "
                          "adapter_config.json)")
    try:
        settings = lora_settings(read_adapter_config(path), model_config_from_dict(
            data.get("model") or {}))
    except CheckpointError as e:
        raise ConfigError(f"train.lora.init_from: {e}") from None
    defaults = LoraConfig()
    for key, value in settings.items():
        given = lora.get(key, getattr(defaults, key))
        if key in lora and given not in (getattr(defaults, key), value) and not (
                key == "targets" and _same_targets(given, value, data)):
            raise ConfigError(f"train.lora.{key}={given!r} differs from the adapter's {value!r} "
                              f"({path}/adapter_config.json): leave it out")
    return {**data, "train": {**train, "lora": {**lora, **settings, "init_from": path}}}


def _same_targets(a: str, b: str, data: dict) -> bool:
    """Whether two train.lora.targets regexes pick the same weights of data's model."""
    from .train.lora import lora_targets
    mcfg = model_config_from_dict(data.get("model") or {})
    try:
        return set(lora_targets(mcfg, TrainConfig(lora=LoraConfig(rank=1, targets=a)))) == set(
            lora_targets(mcfg, TrainConfig(lora=LoraConfig(rank=1, targets=b))))
    except ConfigError:
        return False


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict (`to_dict`'s) as {dotted key: leaf value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def to_dict(cfg) -> dict:
    """A YAML-safe dict that `config_from_dict` turns back into the same config."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else _plain(f.name, v)
    return out


def _plain(name: str, v):
    """A leaf value as YAML writes it (and reads it back)."""
    if name == "rules":
        return {k: (list(_mesh_axes(a)) if a else None) for k, a in v}
    if name == "sources":
        return [{"path": p, "weight": w} for p, w in v]
    return v


def model_config_from_dict(data: dict) -> ModelConfig:
    """A ModelConfig from a model section mapping (old key names accepted)."""
    if not isinstance(data, dict):
        raise ConfigError(f"model should be a mapping, got {data!r}")
    return _build(ModelConfig, resolve_aliases(data, "model."), "model.")



# ---------------------------------------------------------------- documentation
# A key's meaning is written once, as the comment at its field in the dataclass
# (here and in model/config.py); `jaxlm config` prints them.

class KeyDoc(typing.NamedTuple):
    key: str  # dotted: train.lora.rank
    type: str  # int | float | str | bool | list | mapping | bool|str
    default: object  # the dataclass's default, as YAML writes it
    value: object  # the value in the config described (the default without one)
    meaning: str


def field_docs(cls) -> dict[str, str]:
    """{field name: meaning} of a dataclass, read from the comments at its definition:
    the comment lines directly above a field (no blank line between) followed by the
    comment after it on its line. A comment block followed by a blank line heads a
    group and belongs to no field. {} when the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    docs = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id in names):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        after = [comments[i] for i in range(node.lineno, node.end_lineno + 1)
                 if i in comments and not lines[i - 1].lstrip().startswith("#")]
        words = [c for c in above + after if c and not c.startswith(("noqa", "type:"))]
        docs[node.target.id] = " ".join(words)
    return docs


def describe_keys(cfg: Config | None = None) -> list[KeyDoc]:
    """Every leaf key of the config tree, in definition order, with its type, default,
    value in `cfg` (a loaded Config; None: the defaults) and meaning (`field_docs`)."""
    return list(_describe(Config, cfg, ""))


def _describe(cls, cfg, prefix):
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        t, value = hints[f.name], None if cfg is None else getattr(cfg, f.name)
        if dataclasses.is_dataclass(t):
            yield from _describe(t, value, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = _plain(f.name, default)
        value = default if cfg is None else _plain(f.name, value)
        yield KeyDoc(prefix + f.name, _type_name(t, default), _listed(default), _listed(value),
                     docs.get(f.name, ""))


def _listed(v):
    return [_listed(x) for x in v] if isinstance(v, (list, tuple)) else v


def _type_name(t, default) -> str:
    if typing.get_origin(t) is typing.Union:
        return "|".join(a.__name__ for a in typing.get_args(t))
    if t is tuple or typing.get_origin(t) is tuple:
        return "mapping" if isinstance(default, dict) else "list"
    return t.__name__


def config_sections() -> list[str]:
    """The dotted names of every section: model, model.rope, ..., train.lora, ..."""
    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield prefix + f.name
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
    return list(walk(Config, ""))


def select_keys(docs: list[KeyDoc], names) -> list[KeyDoc]:
    """The KeyDocs under the given sections or keys (old flat names accepted), in
    definition order; every KeyDoc when `names` is empty. An unknown name: ConfigError."""
    chosen = set()
    for name in names:
        path = canonical_key(name.strip().rstrip("."))
        hits = {d.key for d in docs if d.key == path or d.key.startswith(path + ".")}
        if not hits:
            known = config_sections() + [d.key for d in docs]
            hint = difflib.get_close_matches(path, known, n=1, cutoff=0.5)
            raise ConfigError(f"unknown config section or key {name!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + "; sections: " + ", ".join(config_sections()))
        chosen |= hits
    return [d for d in docs if not names or d.key in chosen]


__all__ = ["Config", "DataConfig", "TrainConfig", "LoraConfig", "DpoConfig", "KtoConfig",
           "RewardConfig", "DistillConfig", "GrpoConfig", "PpoConfig", "MeshConfig",
           "GenerateConfig", "ServeConfig", "DEFAULT_RULES", "MESH_AXES", "load_config", "config_from_dict",
           "model_config_from_dict", "apply_overrides", "refuse_repeated_keys", "to_dict",
           "flatten", "parse_override", "read_yaml", "ALIASES", "canonical_key",
           "resolve_aliases", "KeyDoc", "field_docs", "describe_keys", "config_sections",
           "select_keys"]
