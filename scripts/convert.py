"""`jaxlm convert`: a jaxlm checkpoint <-> a Hugging Face directory; a LoRA run ->
peft adapters (`--to peft`: adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained(hf_base, dir)` loads; `--to hf` writes the
merged weights).

The tokenizer files beside the weights (tokenizer.model, tokenizer.json and
its special-token files) are copied along.
"""

from __future__ import annotations

import os
import shutil

from ..errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def run_convert(src: str, dst: str, to: str) -> str:
    from ..api import load, save
    if os.path.exists(dst) and os.listdir(dst):
        raise CheckpointError(f"--output {dst} exists and is not empty; choose a new directory")
    if to == "peft":
        from ..api import lora_adapters
        from ..model.peft import save_lora_run
        run, adapters = lora_adapters(src)
        cfg = run.model
        save_lora_run(dst, run, adapters, base_model_name_or_path=run.train.init_from)
    else:
        cfg, params = load(src)
        save(dst, cfg, params, format=to)
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src, name))]
    for name in copied:
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    return (f"wrote {to} checkpoint {dst} ({cfg.family}, {cfg.n_layers} layers, d_model "
            f"{cfg.d_model}, vocab {cfg.vocab_size})"
            + (f"; copied {', '.join(copied)}" if copied else ""))
