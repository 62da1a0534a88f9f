"""Quality of each weight format against float32 on a model trained here.

    python benchmarks/quant_quality.py runs/qbench [--windows 160] [--calibration 128]

The run (a decoder trained on the stdlib corpus, e.g. `jaxlm train --config
tiny-llama model.d_model=256 model.n_heads=8 model.d_ff=768 run_dir=runs/qbench`:
d_model a multiple of 128 for g128) is scored on the held-out split of its
corpus (data.eval_fraction's documents, which training never read), cut into
windows of data.seq_len. For each format: perplexity, its change against
float32, the mean KL(float32 || format) of the next-token distributions and
the share of positions whose greedy (top-1) token equals float32's.

GPTQ / AWQ calibrate on windows of the training split (`model.calibration`).
Formats the checkout does not have are skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _split_texts(run_cfg):
    from jaxlm.train.data import open_corpus, split_corpus
    train, held = split_corpus(open_corpus(run_cfg.data.corpus), run_cfg.data.eval_fraction)

    def texts(docs, n=None):
        out = []
        for i in range(len(docs) if n is None else min(n, len(docs))):
            p = docs.items[i]
            t = pathlib.Path(p).read_text(errors="ignore") if docs.kind == "file" else p
            if t.strip():
                out.append(t)
        return out
    return texts(train, 400), texts(held)


def _windows(tok, texts, seq_len, n):
    from jaxlm.infer.score import prefix_id
    from jaxlm.model.calibration import calibration_windows
    docs = [[prefix_id(tok)] + ids for ids in tok.encode_batch(texts, split_special_tokens=True)]
    return calibration_windows(docs, seq_len, n)


def _score(params, cfg, windows, ref=None, batch=16):
    from jaxlm.model.families import forward
    fwd = jax.jit(lambda p, t: jax.nn.log_softmax(forward(p, cfg, t)[0].astype(jnp.float32), -1))
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    outs = []
    for i in range(0, len(windows), batch):
        t = jnp.asarray(windows[i:i + batch])
        lp = fwd(params, t)
        tgt = t[:, 1:]
        nll += float(-jnp.sum(jnp.take_along_axis(lp[:, :-1], tgt[..., None], -1)))
        n += tgt.size
        if ref is not None:
            r = ref[i // batch]
            kl += float(jnp.sum(jnp.exp(r) * (r - lp)))
            agree += int(jnp.sum(jnp.argmax(r, -1) == jnp.argmax(lp, -1)))
        else:
            outs.append(lp)
    positions = len(windows) * windows.shape[1]
    return {"ppl": float(np.exp(nll / n)), "kl": kl / positions, "top1": agree / positions}, outs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--windows", type=int, default=160, help="held-out windows scored")
    ap.add_argument("--calibration", type=int, default=128, help="calibration windows")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    import jaxlm
    from jaxlm.model import quantize as Q
    from jaxlm.model.calibration import calibrate, quantized_params
    from jaxlm.train.loop import read_run_config
    run_cfg = read_run_config(args.run)
    cfg, params = jaxlm.load(args.run)
    tok = jaxlm.load_tokenizer(args.run)
    train_texts, held_texts = _split_texts(run_cfg)
    seq = run_cfg.data.seq_len
    held = _windows(tok, held_texts, seq, args.windows)
    calib = _windows(tok, train_texts, seq, args.calibration)
    print(f"{args.run}: d_model {cfg.d_model}, {cfg.n_layers} layers; {len(held)} held-out "
          f"windows of {seq}; {len(calib)} calibration windows; group {args.group}",
          flush=True)

    base, ref = _score(params, cfg, held)
    rows = {"float32": base}
    formats = {"int8": lambda: Q.quantize_params(params, dataclasses.replace(
        cfg, weight_dtype="int8"))}
    g = f"g{args.group}"
    for name, dtype in (("fp8", "fp8"), (f"rtn int4 {g}", "int4"), (f"nf4 {g}", "nf4")):
        if dtype in getattr(Q, "WEIGHT_DTYPES", ()):
            formats[name] = (lambda d: lambda: Q.quantize_params(params, dataclasses.replace(
                cfg, weight_dtype=d, quant_group=args.group)))(dtype)
        else:
            print(f"{name}: skipped (model.weight_dtype={dtype} is not in this checkout)")
    for method in ("gptq", "awq"):
        def calibrated(m=method):
            folded, codes = calibrate(params, cfg, calib, m, args.group)
            return quantized_params(folded, cfg, codes, args.group)
        formats[f"{method} int4 {g}"] = calibrated
    for name, make in formats.items():
        t0 = time.perf_counter()
        qp = make()
        took = time.perf_counter() - t0
        row, _ = _score(qp, cfg, held, ref)
        row["quantize_s"] = round(took, 1)
        rows[name] = row
        print(f"{name:14s} ppl {row['ppl']:.4f} ({100 * (row['ppl'] / base['ppl'] - 1):+.2f}%)  "
              f"KL {row['kl']:.5f}  top-1 {100 * row['top1']:.2f}%  ({took:.0f} s)", flush=True)
    print(f"float32 ppl {base['ppl']:.4f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
