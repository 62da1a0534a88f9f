"""Hugging Face GPTQ / AWQ int4 dirs <-> jaxlm's int4 QuantizedWeight: a dir written
with numpy in the documented layout (tests/test_hf_packed.py's loop packers, from
AutoGPTQ's and AutoAWQ's code) loads to weights equal to the numpy unpacking; a
jaxlm int4 export reads back equal, by jaxlm and by that unpacking."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxlm
from jaxlm.errors import CheckpointError
from jaxlm.model import qformat
from test_hf_packed import ref_pack_awq, ref_pack_gptq

GROUP = 16
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _unpack_ref(qweight, qzeros, scales, method):
    """Loop unpacking from the docs -> float w [out, in] (torch Linear orientation)."""
    qweight, qzeros = qweight.view(np.uint32), qzeros.view(np.uint32)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    if method == "gptq":
        n_in, out = qweight.shape[0] * 8, qweight.shape[1]
        q = np.array([[(qweight[i // 8, o] >> (4 * (i % 8))) & 15 for o in range(out)]
                      for i in range(n_in)])
        z = np.array([[((qzeros[g, o // 8] >> (4 * (o % 8))) & 15) + 1 for o in range(out)]
                      for g in range(qzeros.shape[0])])
    else:
        n_in, out = qweight.shape[0], qweight.shape[1] * 8
        nib = {order[k]: k for k in range(8)}
        q = np.array([[(qweight[i, o // 8] >> (4 * nib[o % 8])) & 15 for o in range(out)]
                      for i in range(n_in)])
        z = np.array([[(qzeros[g, o // 8] >> (4 * nib[o % 8])) & 15 for o in range(out)]
                      for g in range(qzeros.shape[0])])
    g = np.arange(n_in) // GROUP
    return ((q.astype(np.int64) - z[g]) * scales.astype(np.float32)[g]).T


@pytest.fixture(scope="module", params=["gptq", "awq"])
def packed_dir(request, tiny_checkpoint, tmp_path_factory):
    """The tiny llama exported to HF, its Linears replaced by random int4 codes in
    `method`'s layout; -> (dir, method, {linear name: float w [out, in]})."""
    method = request.param
    cfg, params = jaxlm.load(tiny_checkpoint("llama"))
    d = tmp_path_factory.mktemp(method) / "hf"
    jaxlm.save(str(d), cfg, params, format="hf")
    tensors = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(1)
    want = {}
    for name in [n for n in list(tensors) if n.endswith(".weight")]:
        if not any(f".{lin}." in name for lin in LINEARS):
            continue
        out, n_in = tensors.pop(name).shape
        codes = rng.integers(0, 16, (n_in, out)).astype(np.uint8)
        zeros = rng.integers(1, 16, (n_in // GROUP, out))
        scales = rng.uniform(0.01, 0.05, (n_in // GROUP, out)).astype(np.float16)
        prefix = name[:-len(".weight")]
        if method == "gptq":
            qweight, qzeros = ref_pack_gptq(codes, zeros)
            tensors[prefix + ".g_idx"] = (np.arange(n_in) // GROUP).astype(np.int32)
        else:
            qweight, qzeros = ref_pack_awq(codes, zeros)
        tensors.update({prefix + ".qweight": qweight, prefix + ".qzeros": qzeros,
                        prefix + ".scales": scales})
        want[prefix] = _unpack_ref(qweight, qzeros, scales, method)
    save_file(tensors, str(d / "model.safetensors"))
    conf = json.loads((d / "config.json").read_text())
    conf["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
         "sym": False} if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
         "version": "gemm"})
    (d / "config.json").write_text(json.dumps(conf))
    return str(d), method, want


def _hf_weights(params):
    """{HF Linear prefix: dequantized w [out, in]} of a jaxlm llama's int4 params."""
    out = {}
    for i in range(params["layers"]["attn"]["q"].shape[0]):
        lay = jax_index(params["layers"], i)
        for lin, (sub, name) in zip(LINEARS, [("attn", "q"), ("attn", "k"), ("attn", "v"),
                                              ("attn", "o"), ("mlp", "gate"), ("mlp", "up"),
                                              ("mlp", "down")]):
            w = np.asarray(qformat.dequantize(lay[sub][name]))
            n_in = 2 if name == "o" else 1
            k = int(np.prod(w.shape[:n_in]))
            out[f"model.layers.{i}.{lin}"] = w.reshape(k, -1).T
    return out


def jax_index(tree, i):
    import jax
    return jax.tree.map(lambda a: a[i], tree)


def test_packed_dir_loads_to_the_numpy_unpacking_and_exports_back(packed_dir, tmp_path):
    d, method, want = packed_dir
    cfg, params = jaxlm.load(d)
    assert (cfg.weight_dtype, cfg.quant_group) == ("int4", GROUP)
    q = params["layers"]["attn"]["q"]
    assert isinstance(q, qformat.QuantizedWeight) and q.fmt == "int4" and q.zero is not None
    got = _hf_weights(params)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # export: GPTQ's layout, read back by the numpy unpacking and by jaxlm
    out = tmp_path / "export"
    jaxlm.save(str(out), cfg, params, format="hf")
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "gptq" and conf["group_size"] == GROUP
    assert conf["checkpoint_format"] == "gptq"  # every zero >= 1: v1
    tensors = load_file(str(out / "model.safetensors"))
    for k in want:
        np.testing.assert_array_equal(_unpack_ref(tensors[k + ".qweight"],
                                                  tensors[k + ".qzeros"],
                                                  tensors[k + ".scales"], "gptq"), want[k])
    _, back = jaxlm.load(str(out))
    for k, w in _hf_weights(back).items():
        np.testing.assert_array_equal(w, want[k], err_msg=k)


def test_other_methods_are_refused_by_name(packed_dir, tmp_path):
    d, _, _ = packed_dir
    bad = tmp_path / "bnb"
    shutil.copytree(d, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="quant_method='bitsandbytes' is not supported"):
        jaxlm.load(str(bad))


def test_packed_dir_loads_sharded(packed_dir):
    """Each int4 child read straight into its sharding on an fsdp x tensor mesh."""
    from jaxlm.config import MeshConfig
    from jaxlm.model.quantize import params_logical_axes
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.sharding.rules import tree_shardings
    import jax
    d, _, want = packed_dir
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    cfg, params = jaxlm.load(d, mesh=mesh)
    spec = tree_shardings(mesh, params_logical_axes(cfg), MeshConfig().rules)
    q, sq = params["layers"]["attn"]["q"], spec["layers"]["attn"]["q"]
    for part in ("q", "scale", "zero"):
        got, exp = getattr(q, part), getattr(sq, part)
        assert got.sharding.is_equivalent_to(exp, got.ndim), part
    assert len({s.device for s in q.q.addressable_shards}) == 8
    assert q.q.addressable_shards[0].data.size < q.q.size  # split, not replicated
    name = "model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(_hf_weights(jax.device_get(params))[name], want[name])
