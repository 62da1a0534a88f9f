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


def run_convert(src: str, dst: str, to: str) -> str:
    from ..api import load, save
    from ..model.companions import FILES, copy_companions
    if os.path.exists(dst) and os.listdir(dst):
        raise CheckpointError(f"--output {dst} exists and is not empty; choose a new directory")
    if to == "peft":
        from ..api import lora_adapters
        from ..model.peft import save_lora_run
        run, adapters = lora_adapters(src)
        cfg = run.model
        save_lora_run(dst, run, adapters, base_model_name_or_path=run.train.init_from)
        copy_companions(src, dst)
    else:
        cfg, params = load(src)
        save(dst, cfg, params, format=to, companions=src)
    copied = [n for n in FILES if os.path.isfile(os.path.join(dst, n))]
    return (f"wrote {to} checkpoint {dst} ({cfg.family}, {cfg.n_layers} layers, d_model "
            f"{cfg.d_model}, vocab {cfg.vocab_size})"
            + (f"; with {', '.join(copied)}" if copied else ""))
