"""jaxlm as a backend of EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra).

    python -m jaxlm.infer.harness --model jaxlm --model_args checkpoint=PATH --tasks hellaswag
    jaxlm eval --checkpoint PATH --tasks hellaswag            # the same, through jaxlm's CLI

    from jaxlm.infer.harness import JaxlmLM, register
    register()                                                # then lm_eval's --model jaxlm
    lm_eval.simple_evaluate(model=JaxlmLM(params=params, cfg=cfg, tokenizer=tok), tasks=[...])

`JaxlmLM` implements lm-eval's model API on jaxlm's own paths: `loglikelihood` on
`jaxlm.score` (lm-eval's encoding of each pair, its left truncation), and
`loglikelihood_rolling` on the perplexity windows (disjoint windows of the model's
length), `generate_until` on the engine (stop strings, max_gen_toks, greedy or
sampled; chat templates through lm-eval's `apply_chat_template` hooks). Texts are
encoded as the `hf` backend encodes them with the checkpoint's tokenizer
(`tokenizer(text)`: a Llama tokenizer's BOS, none for GPT-2's), so both backends
give the same numbers on the same weights.

lm-eval 0.4 loads no model plugins by entry point, and fills its model registry with
the built-in backends only while it is empty: `register` imports `lm_eval.models`
first (registering earlier would leave `hf` out), then adds "jaxlm".
"""

from __future__ import annotations

import os
import sys

from ..errors import CheckpointError, ConfigError, InputError
from .engine import bucket

try:
    from lm_eval.api.model import TemplateLM
except ImportError as e:  # the `eval` extra is not installed
    raise ImportError("jaxlm's lm-eval backend needs lm-eval: pip install 'jaxlm[eval]'") from e

NAME = "jaxlm"


def register() -> None:
    """Adds "jaxlm" to lm-eval's model registry, after its built-in backends."""
    import lm_eval.models  # noqa: F401 - fills the registry with hf, vllm, ... first
    from lm_eval.api.registry import model_registry
    if NAME not in model_registry:
        model_registry.register(NAME, target=f"{__name__}:JaxlmLM")


def _flag(value, name: str):
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}={value!r} must be true or false")


class JaxlmLM(TemplateLM):
    """lm-eval's model over a jaxlm checkpoint (a run dir, an HF dir, a peft dir), or
    over params already in memory (params=, cfg=, tokenizer=).

    model_args: checkpoint (alias pretrained), step, dtype, batch_size (rows per
    forward pass; generation slots), max_length (default model.max_seq_len),
    max_gen_toks (default 256), add_bos_token, prefix_token_id, chat_template_dir
    (where the template comes from with params=). A mesh (with mesh=, rules=) runs
    every pass sharded over its batch axes."""

    backend = "causal"

    def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, *,
                 params=None, cfg=None, tokenizer=None, step=None, dtype: str | None = None,
                 batch_size=1, max_batch_size=None, device=None, max_length=None,
                 max_gen_toks=256, add_bos_token=None, prefix_token_id=None, mesh=None,
                 rules=None, chat_template_dir: str | None = None, progress=True, **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"--model_args: unknown key(s) {', '.join(sorted(unknown))} for "
                              "the jaxlm backend (checkpoint, step, dtype, batch_size, "
                              "max_length, max_gen_toks, add_bos_token, prefix_token_id)")
        path = checkpoint or pretrained
        if params is None:
            if not path:
                raise ConfigError("the jaxlm backend needs --model_args checkpoint=PATH")
            from ..api import companions_dir, load
            from .evaluate import tokenizer_for
            files = companions_dir(path)
            tokenizer = tokenizer or tokenizer_for(files)
            cfg, params = load(path, cfg=cfg, mesh=mesh, rules=rules, dtype=dtype,
                               step=None if step is None else int(step))
            chat_template_dir = chat_template_dir or files
        elif cfg is None or tokenizer is None:
            raise ConfigError("JaxlmLM(params=...) needs cfg= and tokenizer= too")
        if cfg.family != "decoder":
            raise InputError(f"the jaxlm backend scores causal decoders; {path or 'cfg'} is a "
                             f"{cfg.family} model")
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.mesh, self.rules = mesh, rules
        self._path, self._template_dir = path, chat_template_dir
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 16  # no probing: a fixed, compiled batch
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self._max_length = int(max_length) if max_length else cfg.max_seq_len
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self._prefix = None if prefix_token_id is None else int(prefix_token_id)
        self._progress = _flag(progress, "progress")
        self.truncated = 0  # requests cut from the left to the model's length

    # ---------------------------------------------------------------- lm-eval's API

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        from .score import prefix_id
        return prefix_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return os.path.abspath(self._path or "jaxlm").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """`tokenizer(string)` as the hf backend calls it: special tokens framed unless
        add_special_tokens=False (or add_bos_token=False), or the string already starts
        with the prefix token's text (a rendered chat template)."""
        add = add_special_tokens
        if add is None:
            add = self.add_bos_token if self.add_bos_token is not None else True
            bos = self.tokenizer.decode([self.prefix_token_id])
            if add_special_tokens is None and bos and string.startswith(bos):
                add = False
        ids = self.tokenizer.encode(string, add_special_tokens=bool(add))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids) -> str:
        from .text import decode_ids
        return decode_ids(self.tokenizer, ids, self.cfg.vocab_size)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        from .score import score_ids
        out = score_ids(self.params, self.cfg, [(r[1], r[2]) for r in requests],
                        batch_size=self.batch_size, max_length=self.max_length,
                        mesh=self.mesh, rules=self.rules,
                        progress=self._progress and not disable_tqdm)
        self._note_truncated(out.truncated)
        return [(float(lp), bool(g)) for lp, g in zip(out.logprobs, out.is_greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from .score import perplexity
        docs = [[self.prefix_token_id] + self.tok_encode(r.args[0]) for r in requests]
        out = perplexity(self.params, self.cfg, docs, max_length=self.max_length,
                         batch_size=self.batch_size, mesh=self.mesh, rules=self.rules,
                         progress=self._progress and not disable_tqdm)
        return [-float(x.sum()) for x in out.token_nlls]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                          postprocess_generated_text)
        results: list = [None] * len(requests)
        groups: dict = {}
        for i, r in enumerate(requests):  # requests with the same settings run together
            groups.setdefault(repr(sorted(r.args[1].items(), key=str)), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text or None)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise InputError(f"max_gen_toks={max_new} leaves no room for a context in the "
                                 f"model's {self.max_length} positions")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length
                                       - max_new) for i in members]
            texts = self._generate(prompts, max_new, kwargs, [u for u in until if u])
            for i, text in zip(members, texts):
                results[i] = postprocess_generated_text(text, until, None)
        return results

    def _generate(self, prompts, max_new: int, kwargs: dict, until: list[str]) -> list[str]:
        from .generate import generate as generate_ids
        from .text import generation_settings
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        settings = {"temperature": float(kwargs.get("temperature", 1.0)) if sample else 0.0}
        if sample:
            settings.update(top_p=float(kwargs.get("top_p", 1.0)),
                            top_k=int(kwargs.get("top_k", 0) or 0),
                            seed=int(kwargs.get("seed", 0) or 0))
        eos = list(generation_settings(self._template_dir, self.tokenizer).eos_ids) \
            if self._template_dir else [i for i in (self.eot_token_id,) if i is not None]
        from .score import _batch_multiple, _mesh_context
        shards = _batch_multiple(self.mesh, self.rules)  # slots split over the batch axes
        slots = bucket(min(self.batch_size, len(prompts)), shards)
        with _mesh_context(self.mesh, self.rules):
            out = generate_ids(self.params, self.cfg, prompts, max_new_tokens=max_new,
                               eos_id=eos or None, stop=until, detokenize=self.tok_decode,
                               slots=slots, **settings)
        return list(out.texts)

    # ---------------------------------------------------------------- chat templates

    def chat_template(self, chat_template=False):
        if chat_template is False or chat_template is None:
            return None
        from .text import chat_template_for
        if self._template_dir is None:
            raise CheckpointError("--apply_chat_template: no checkpoint dir to read a chat "
                                  "template from (pass chat_template_dir=)")
        return chat_template_for(self._template_dir)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        from ..model.chat import render_chat, template_tokens
        return render_chat(self.chat_template(True), chat_history,
                           add_generation_prompt=add_generation_prompt,
                           **template_tokens(self.tokenizer))

    def _note_truncated(self, n: int) -> None:
        if n:
            self.truncated += n
            print(f"jaxlm: {n} request(s) longer than the model's {self.max_length} positions "
                  "were cut from the left", file=sys.stderr)


def main(argv=None) -> None:
    """lm-eval's own command line with "jaxlm" registered."""
    register()
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    from jaxlm.infer.harness import main as _main  # the registered class is that module's
    _main()
