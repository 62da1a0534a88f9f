"""Pipeline parallelism: the layer stack over `mesh.stage` on 8 CPU devices
matches one device (forward logits, loss, grad norm, params after one AdamW step;
Llama- and Mixtral-style), each stage holds 1/S of the stack, the loop's measured
bubble is the schedule's formula, a stage run resumes into a mesh without stages,
and bad input is one line."""

import dataclasses

import jax
import numpy as np
import pytest
from test_sharding import assert_rule_shardings
import tiny_models

import jaxlm
from jaxlm.errors import ConfigError
from jaxlm.model import forward, model_specs
from jaxlm.config import Config, DataConfig, MeshConfig, TrainConfig, load_config
from jaxlm.model.config import ModelConfig, MoeConfig
from jaxlm.sharding.mesh import make_mesh
from jaxlm.sharding.pipeline import Pipeline, bubble_fraction, pipeline_of, schedule
from jaxlm.sharding.rules import named_sharding, use_mesh
from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxlm.train.state import create_state, state_shardings
from jaxlm.train.step import compile_steps

B, S = 8, 32
_DENSE = dict(family="decoder", vocab_size=256, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
              d_ff=64, max_seq_len=32)
MODELS = {"llama": ModelConfig(**_DENSE),
          "moe": ModelConfig(**_DENSE, moe=MoeConfig(n_experts=4, experts_per_token=2))}
MESHES = {"stage4_data2": dict(stage=4, data=2), "stage2_fsdp2_tensor2": dict(stage=2, data=1,
                                                                              fsdp=2, tensor=2),
          "stage2_context4": dict(stage=2, data=1, context=4)}
M = 4  # microbatches in the parity cases (2 under context: see below)


def make_cfg(model, mesh, microbatches=M, accum=1, remat="none"):
    return Config(model=dataclasses.replace(MODELS[model], remat=remat),
                  data=DataConfig(seq_len=S, batch_size=B),
                  train=TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-3, eps=1e-3,
                                    loss_vocab_chunk=64, pipeline_microbatches=microbatches,
                                    grad_accum_steps=accum),
                  mesh=MeshConfig(**mesh))


def host_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, (B, S + 1), dtype=np.int32)
    seg = np.ones((B, S), np.int32)
    seg[:, S - 5:] = 2  # two packed documents per row
    pos = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    pos[:, S - 5:] -= S - 5
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos,
            "segment_ids": seg, "loss_mask": np.ones((B, S), np.float32)}


def run(cfg, devices=None, hlo=False):
    """(tx, metrics, state after one step, HLO, logits) of `cfg` on its mesh; the
    pipelined train step and forward when mesh.stage > 1. HLO: the compiled step's
    text when `hlo` (the same single compile), else None. logits: the forward of the
    initial params [B, S, V] (pipelined over the same microbatches as the step)."""
    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.train, model_specs(cfg.model))
    pipe = pipeline_of(cfg)
    with use_mesh(mesh, cfg.mesh.rules):
        state = create_state(cfg, mesh, tx, seed=0)
        sh = state_shardings(cfg, mesh, tx)
        batch_sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
        batch = jax.device_put(host_batch(), batch_sh)
        logits = jax.device_get(jax.jit(lambda p, b: forward(
            p, cfg.model, b["tokens"], b["positions"], b["segment_ids"], pipeline=pipe)[0])(
                state.params, batch))
        step, _ = compile_steps(cfg.model, tx, learning_rate_schedule(cfg.train), sh, batch_sh,
                                cfg.train.loss_vocab_chunk, tcfg=cfg.train, pipeline=pipe)
        text = step.lower(state, batch).compile().as_text() if hlo else None
        state, metrics = step(state, batch)  # the executable just compiled (jax's cache)
    return tx, jax.device_get(metrics), state, text, logits


_REF = {}


def reference(model, accum=1):
    """One device, no stages (MoE: the same M microbatches by accumulation, since the
    router losses are per-microbatch means in both)."""
    if (model, accum) not in _REF:
        _, metrics, state, _, logits = run(make_cfg(model, dict(data=1), accum=accum),
                                           jax.devices()[:1])
        _REF[model, accum] = metrics, jax.device_get(state.params), logits
    return _REF[model, accum]


# Mixtral-style (4 experts, top-2) on every stage mesh: by default on (2 stage x 4
# context), the case with the most paths at once (MoE and the ring inside stages, the
# backward through both); (4 stage x 2 data) and (2 stage x 2 fsdp x 2 tensor) (~30 s
# each on a busy 2-core machine) under -m slow: their stage / fsdp / tensor mechanics
# are llama's default cases, MoE inside stages the default moe case (+ the forward
# with expert parallelism in test_bubble_...).
@pytest.mark.parametrize("model,mesh_name,remat", [
    ("llama", "stage4_data2", "full"), ("llama", "stage2_fsdp2_tensor2", "none"),
    ("llama", "stage2_context4", "none"), ("moe", "stage2_context4", "none"),
    pytest.param("moe", "stage4_data2", "full", marks=pytest.mark.slow),
    pytest.param("moe", "stage2_fsdp2_tensor2", "none", marks=pytest.mark.slow)])
def test_parity_and_stage_sharding(model, mesh_name, remat):
    """Forward logits, loss, grad norm and params after one AdamW step within 1e-5
    of one device; under context, ring attention inside each stage keeps `seq` sharded."""
    sizes = MESHES[mesh_name]
    c = sizes.get("context", 1)
    moe = MODELS[model].moe.n_experts > 0
    # under context: 2 microbatches of 4 rows, so that a microbatch's per-device
    # activation [4, S / c, D] has a shape no weight has (a stage holds 2 layers).
    # MoE: M microbatches everywhere (one reference, accumulated over the same M), no
    # HLO check (dropless MoE sorts a microbatch's tokens by expert: XLA gathers them)
    cfg = make_cfg(model, sizes, microbatches=2 if c > 1 and not moe else M, remat=remat)
    tx, metrics, state, hlo, logits = run(cfg, hlo=c > 1 and not moe)
    ref_metrics, ref_params, ref_logits = reference(model, accum=M if moe else 1)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5, err_msg="logits")
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 jax.device_get(state.params), ref_params)
    assert_rule_shardings(cfg, tx, state)
    n_stage, n_layers = cfg.mesh.stage, cfg.model.n_layers
    for path, w in jax.tree_util.tree_leaves_with_path(state.params["layers"]):
        assert w.sharding.spec[0] == "stage", (path, w.sharding.spec)
        for shard in w.addressable_shards:  # each device: 1/S of the stack
            assert shard.data.shape[0] == n_layers // n_stage, path
        starts = {shard.index[0].start or 0 for shard in w.addressable_shards}
        assert starts == set(range(0, n_layers, n_layers // n_stage))
    if hlo is not None:  # per device: S / c tokens of each row, in the stages (a microbatch of
        # `rows`) and in the embedding and loss (all B rows); the ring's K/V chunks
        # hold S / c tokens too: neither the sequence nor K/V is ever gathered
        mc, rows = cfg.model, B // 2
        kv = f"{mc.n_kv_heads},{mc.d_model // mc.n_heads}"
        assert f"f32[{rows},{S // c},{mc.d_model}]" in hlo
        assert f"f32[{B},{S // c},{mc.d_model}]" in hlo and f"f32[{rows},{S // c},{kv}]" in hlo
        for b in (rows, B):
            assert f"f32[{b},{S},{mc.d_model}]" not in hlo and f"f32[{b},{S},{kv}]" not in hlo


def test_bubble_measured_by_the_loop_and_circular_parity():
    """8 microbatches on 4 stages: the loop's own busy-tick count gives
    (S-1)/(M+S-1); 2 stages x 2 repeats (circular) give (S-1)/(R*M+S-1) and the
    single-device logits."""
    params = jaxlm.init_params(MODELS["llama"], jax.random.key(0))
    batch = host_batch()
    want = forward(params, MODELS["llama"], batch["tokens"], batch["positions"],
                   batch["segment_ids"])[0]
    for stages, m, r in ((4, 8, 1), (2, 4, 2)):
        mesh = make_mesh(MeshConfig(stage=stages, data=1, devices=stages))
        with use_mesh(mesh, MeshConfig().rules):
            logits, aux = jax.jit(lambda p, b: forward(
                p, MODELS["llama"], b["tokens"], b["positions"], b["segment_ids"],
                pipeline=Pipeline(m, r)))(params, batch)
        busy, ticks = int(aux["pipeline"]["busy"]), aux["pipeline"]["ticks"]
        assert busy == stages * r * m  # every (microbatch, repeat) once on every stage
        idle = 1 - busy / (stages * ticks)
        assert idle == pytest.approx(bubble_fraction(stages, m, r))
        assert idle == pytest.approx((stages - 1) / (r * m + stages - 1))
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
    # Mixtral-style, with expert parallelism inside the stages (capacity E / k: nothing
    # drops, so one device without a mesh is the oracle): the experts' all-to-all runs
    # in the stage loop; router stats are the mean over microbatches (as with accumulation)
    moe = dataclasses.replace(MODELS["moe"], moe=dataclasses.replace(MODELS["moe"].moe,
                                                                   capacity_factor=2.0))
    params = jaxlm.init_params(moe, jax.random.key(0))
    fwd = jax.jit(lambda p, b: forward(p, moe, b["tokens"], b["positions"], b["segment_ids"]))
    parts = [jax.tree.map(lambda x: x[j::4], batch) for j in range(4)]
    outs = [fwd(params, part) for part in parts]
    want_stats = jax.tree.map(lambda *a: np.mean(a, axis=0), *[a["moe"] for _, a in outs])
    with use_mesh(make_mesh(MeshConfig(stage=2, data=1, expert=2, devices=4)),
                  MeshConfig().rules):
        staged = jax.jit(lambda p, b: forward(
            p, moe, b["tokens"], b["positions"], b["segment_ids"], pipeline=Pipeline(4))).lower(
                params, batch).compile()
        logits, aux = staged(params, batch)
    assert "all-to-all" in staged.as_text()
    for j, (part_logits, _) in enumerate(outs):
        np.testing.assert_allclose(logits[j::4], part_logits, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 aux["moe"], want_stats)
    mb, rep = schedule(4, 8)
    assert (mb >= 0).sum() == 32 and mb.shape == (11, 4)
    for s in range(4):  # each stage: microbatches in order, starting at tick s
        assert mb[s:s + 8, s].tolist() == list(range(8)) and (rep[:, s] <= 0).all()


def test_bad_input_one_line():
    llama = MODELS["llama"]

    def cfg(mesh, model=llama, m=0, batch=B, accum=1):
        return Config(model=model, data=DataConfig(seq_len=S, batch_size=batch),
                      train=TrainConfig(pipeline_microbatches=m, grad_accum_steps=accum),
                      mesh=MeshConfig(**mesh))
    with pytest.raises(ConfigError, match=r"model.n_layers=4 does not divide into mesh.stage=4 "
                                          r"x mesh.pipeline_repeats=2"):
        cfg(dict(stage=4, pipeline_repeats=2), m=8)
    with pytest.raises(ConfigError, match="model.n_layers=4 does not divide.*mesh.stage=3"):
        cfg(dict(stage=3))
    with pytest.raises(ConfigError, match="train.pipeline_microbatches=2 is fewer than "
                                          "mesh.stage=4"):
        cfg(dict(stage=4), m=2)
    with pytest.raises(ConfigError, match="train.pipeline_microbatches=6 does not divide the "
                                          "batch of 8 rows"):
        cfg(dict(stage=2), m=6)
    with pytest.raises(ConfigError, match="pipeline_microbatches=3 does not divide the batch "
                                          "of 4 rows"):
        cfg(dict(stage=2), m=3, accum=2)
    bert = tiny_models.BERT
    with pytest.raises(ConfigError, match="mesh.stage=2: pipeline parallelism supports "
                                          "model.family='decoder' only, not 'encoder'"):
        cfg(dict(stage=2), model=bert)
    with pytest.raises(ConfigError, match="pipeline_repeats=2 must be >= 1, and needs mesh.stage"):
        MeshConfig(pipeline_repeats=2)
    with pytest.raises(ConfigError, match="model.positions='alibi'.*mesh.stage=2"):
        cfg(dict(stage=2), model=dataclasses.replace(llama, positions="alibi"))
    # a microbatch must split over the batch's mesh axes (the loop checks on its mesh)
    from jaxlm.sharding.pipeline import check_pipeline_mesh
    c = cfg(dict(stage=2, data=4), m=4)  # 2 rows per microbatch over 4 data shards
    with pytest.raises(ConfigError, match="a microbatch of 2 rows does not divide over the 4 "
                                          "batch shards"):
        check_pipeline_mesh(c, dict(stage=2, data=4, fsdp=1, context=1, expert=1, tensor=1))


def test_stage_run_resumes_into_a_mesh_without_stages(tmp_path, sp_tokenizer_file):
    """An uninterrupted 4-step run on 2 stages (checkpoints at 2 and 4); its step-2
    checkpoint resumed on one device without stages for 2 more steps ends with
    the same params (within 1e-5: the pipeline's sums are in another order)."""
    import shutil

    from jaxlm.train.loop import train
    base = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32",
            "data.batch_size=4", "data.max_docs=10", "data.shuffle_rows=64",
            "train.steps=4", "train.warmup_steps=0",
            "train.eval_every=100", "train.eval_batches=1", "train.checkpoint_every=2",
            "train.log_every=1", "train.tensorboard=false", "train.loss_vocab_chunk=64",
            f"data.tokenizer={sp_tokenizer_file}"]
    staged = base + ["mesh.stage=2", "mesh.data=1", "mesh.devices=2",
                     "train.pipeline_microbatches=2"]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    train(load_config(None, staged + [f"run_dir={ref_dir}"]), progress=False)
    shutil.copytree(ref_dir, run_dir)
    train(load_config(None, base + ["mesh.devices=1", f"run_dir={run_dir}"]), resume=True,
          step=2, progress=False)
    _, got = jaxlm.load(run_dir, step=4)
    _, want = jaxlm.load(ref_dir, step=4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=1e-5, rtol=0), got, want)
    _, moved = jaxlm.load(ref_dir, step=2)  # the steps after the checkpoint changed them
    assert not np.allclose(moved["layers"]["attn"]["q"], want["layers"]["attn"]["q"])


def test_plan_accounts_for_stages(capsys):
    from jaxlm.scripts.cli import main
    from jaxlm.sharding.plan import plan
    over = ["mesh.fsdp=8", "mesh.data=1", "data.batch_size=64"]
    base = plan(load_config("llama3-8b", over), n_devices=8)
    staged = plan(load_config("llama3-8b", over + ["mesh.stage=4",
                                                   "train.pipeline_microbatches=8"]),
                  n_devices=32)
    assert staged["mesh"]["stage"] == 4 and base["bubble"] == 0
    assert staged["bubble"] == pytest.approx(3 / 11)
    cfg = load_config("llama3-8b", over)
    layers = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(jax.eval_shape(
        lambda: jaxlm.init_params(cfg.model, jax.random.key(0)))["layers"]))
    # the layer stack is split 4 ways; the rest (embedding, head, final norm) is not
    assert base["params"] - staged["params"] == pytest.approx(layers / 8 * 3 / 4, rel=1e-6)
    assert staged["activations"] < base["activations"]
    assert main(["plan", "--config", "llama3-8b", "--devices", "32", *over, "mesh.stage=4",
                 "train.pipeline_microbatches=8"]) == 0
    assert "bubble 27.3%" in capsys.readouterr().out
