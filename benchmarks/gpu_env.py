"""The environment part of benchmarks/gpu_check.sh: device, versions, imports.

    python benchmarks/gpu_env.py OUT.json [--dry-run]
"""

from __future__ import annotations

import importlib
import sys
import warnings

import jax

from benchlib import device_info, error_of, write_json

MODULES = ("jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "sentencepiece", "tokenizers",
           "safetensors", "yaml", "tqdm", "tensorboardX", "triton")


def main(argv=None) -> int:
    args = argv or sys.argv[1:]
    out = {**device_info(), "dry_run": "--dry-run" in args, "python": sys.version.split()[0],
           "devices": [str(d) for d in jax.devices()], "modules": {}}
    for name in MODULES:
        try:
            out["modules"][name] = getattr(importlib.import_module(name), "__version__", "ok")
        except Exception as e:  # noqa: BLE001 - a missing module is a finding
            out["modules"][name] = "missing: " + error_of(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            from jax.experimental.pallas import triton as plgpu
            plgpu.CompilerParams(num_warps=4, num_stages=2)
            out["pallas_triton"] = "ok"
        except Exception as e:  # noqa: BLE001
            out["pallas_triton"] = error_of(e)
    out["pallas_warnings"] = sorted({str(w.message)[:300] for w in caught})
    try:
        import jaxlm
        import jaxlm.scripts.bench  # noqa: F401  what the train part imports
        out["jaxlm_import"] = "ok"
        out["jaxlm_path"] = jaxlm.__file__  # this checkout (the symlink), not an installed copy
    except Exception as e:  # noqa: BLE001
        out["jaxlm_import"] = error_of(e)
    print(out)
    write_json(args[0], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
