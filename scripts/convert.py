"""`jaxlm convert`: a jaxlm checkpoint <-> a Hugging Face directory; a LoRA run ->
peft adapters (`--to peft`: adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained(hf_base, dir)` loads; `--to hf` writes the
merged weights).

What travels with the weights goes along (`jaxlm.model.companions`): the tokenizer
files, the chat template and generation_config.json; an HF export's config.json
names the special-token ids.
"""

from __future__ import annotations

import os

from ..errors import CheckpointError


def run_convert(src: str, dst: str, to: str, init_from: str | None = None,
                accept_base_change: bool = False) -> str:
    """`init_from` / `accept_base_change`: a LoRA run's moved / changed base (`jaxlm.load`)."""
    from ..api import checkpoint_kind, load, save
    from ..model.companions import FILES, copy_companions
    if os.path.exists(dst) and os.listdir(dst):
        raise CheckpointError(f"--output {dst} exists and is not empty; choose a new directory")
    if to == "peft":
        from ..api import lora_adapters
        from ..model.peft import save_lora_run
        from ..train.base import resolve
        run, adapters = lora_adapters(src)
        cfg = run.model
        base, _, _ = resolve(src, run.train.init_from, init_from, accept_base_change)
        if checkpoint_kind(base) != "hf":
            raise CheckpointError(
                f"--to peft: the base of {src}, {base}, is a jaxlm run, which transformers "
                f"cannot load: export it (jaxlm convert --input {base} --to hf --output "
                "HF_DIR), then pass train.init_from=HF_DIR --accept-base-change (its files "
                "differ), or export the merged model with --to hf")
        save_lora_run(dst, run, adapters, base_model_name_or_path=base)
        copy_companions(src, dst)
    else:
        cfg, params = load(src, init_from=init_from, accept_base_change=accept_base_change)
        save(dst, cfg, params, format=to, companions=src)
    copied = [n for n in FILES if os.path.isfile(os.path.join(dst, n))]
    return (f"wrote {to} checkpoint {dst} ({cfg.family}, {cfg.n_layers} layers, d_model "
            f"{cfg.d_model}, vocab {cfg.vocab_size})"
            + (f"; with {', '.join(copied)}" if copied else ""))
