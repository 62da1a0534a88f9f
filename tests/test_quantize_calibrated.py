"""`jaxlm quantize --dtype int4 --method gptq|awq --calibration FILES` on a tiny
checkpoint: int4 nodes with calibrated zero points, closer to the float model than
round-to-nearest on held-out text; bad input is one line and writes nothing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.model.calibration import calibrate, calibration_windows, quantized_params
from jaxlm.model.families import forward
from jaxlm.model.quantize import dequantize_params, quantize_params
from jaxlm.scripts import cli
from jaxlm.train.data import load_documents

GROUP = "16"


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    docs = load_documents("stdlib", max_docs=60)
    d = tmp_path_factory.mktemp("calib")
    (d / "calib.txt").write_text("\n".join(docs[:30]))
    return str(d / "calib.txt"), docs[40:]


@pytest.fixture(scope="module")
def gptq_dir(tiny_checkpoint, texts, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gptq") / "int4")
    assert cli.main(["quantize", "--checkpoint", tiny_checkpoint("llama"), "--out", out,
                     "--dtype", "int4", "--method", "gptq", "--calibration", texts[0],
                     "--calibration-samples", "32", "--group", GROUP, "--act-order"]) == 0
    return out


def test_gptq_and_awq_beat_round_to_nearest(tiny_checkpoint, gptq_dir, texts):
    cfg, params = jaxlm.load(tiny_checkpoint("llama"))
    qcfg, qparams = jaxlm.load(gptq_dir)
    assert (qcfg.weight_dtype, qcfg.quant_group) == ("int4", 16)
    up = qparams["layers"]["mlp"]["up"]
    assert up.fmt == "int4" and up.q.dtype == jnp.uint8 and up.zero is not None
    assert len(np.unique(np.asarray(up.zero))) > 2  # asymmetric: not RTN's fixed 8
    tok = jaxlm.load_tokenizer(gptq_dir)
    rows = [tok.encode(d)[:32] for d in texts[1]]
    rows = jnp.asarray(np.asarray([r for r in rows if len(r) == 32][:16], np.int32))
    calib = calibration_windows([tok.encode(open(texts[0]).read())], 32, 32)
    folded, codes = calibrate(params, cfg, calib, "awq", 16)  # AWQ's scales folded in
    awq = quantized_params(folded, cfg, codes, 16)  # int4 nodes: what is stored
    for w in ("up", "down"):  # the nodes are the float weights calibration ran on
        np.testing.assert_array_equal(np.asarray(dequantize_params(awq)["layers"]["mlp"][w]),
                                      np.asarray(folded["layers"]["mlp"][w]))
    # every model as float params (one compiled forward): the nodes dequantized
    fwd = jax.jit(lambda p: jax.nn.log_softmax(forward(p, cfg, rows)[0], -1))
    ref = fwd(params)

    def kl(p):
        return float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - fwd(dequantize_params(p))), -1)))
    kl_rtn, kl_gptq, kl_awq = kl(quantize_params(params, qcfg)), kl(qparams), kl(awq)
    assert kl_gptq < kl_rtn and kl_awq < kl_rtn, (kl_gptq, kl_awq, kl_rtn)


def test_bad_input_is_one_line(tiny_checkpoint, texts, tmp_path, capsys):
    ck = tiny_checkpoint("llama")
    out = str(tmp_path / "out")
    cases = [(["--dtype", "int4", "--method", "gptq"], "--calibration FILES"),
             (["--dtype", "int8", "--method", "awq", "--calibration", texts[0]], "int4"),
             (["--dtype", "int4", "--method", "obq", "--calibration", texts[0]], "obq"),
             (["--dtype", "int4", "--method", "awq", "--calibration", texts[0], "--act-order"],
              "--act-order"),
             (["--dtype", "int4", "--method", "gptq", "--calibration", texts[0], "--group",
               "24"], "does not divide"),
             (["--dtype", "int4", "--method", "gptq", "--group", GROUP, "--calibration",
               str(tmp_path / "missing.txt")], "missing.txt")]
    for args, needle in cases:
        assert cli.main(["quantize", "--checkpoint", ck, "--out", out, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and needle in err, err
    assert not os.path.exists(out) and os.listdir(tmp_path) == []
