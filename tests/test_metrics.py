"""Throughput accounting: per-device MFU, the peak table, MaxText's FLOP count."""

import dataclasses

import jax
import pytest

from jaxlm.errors import ConfigError
from jaxlm.config import TrainConfig
from jaxlm.model.config import ModelConfig, model_flops_per_token
from jaxlm.train import metrics


def test_mfu_is_per_device():
    """8 devices each running the single-device throughput give the single-device MFU."""
    per_device_tps, fpt, peak = 1234.0, 5.6e6, 7.8e12
    one = metrics.mfu(per_device_tps, fpt, 1, peak)
    assert metrics.mfu(8 * per_device_tps, fpt, 8, peak) == pytest.approx(one, rel=1e-12)
    assert one == pytest.approx(per_device_tps * fpt / peak)


def test_peak_table_and_override(monkeypatch):
    assert metrics.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert metrics.datasheet_peak("NVIDIA H200") == 989e12
    assert metrics.datasheet_peak("TPU v5 lite") == 197e12
    assert metrics.datasheet_peak("TPU v5p") == 459e12
    assert metrics.datasheet_peak("TPU v6 lite") == 918e12
    assert metrics.datasheet_peak("TPU v4") == 275e12
    assert metrics.datasheet_peak("cpu") is None
    assert metrics.device_peak(override=3e12) == (3e12, "config")
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype, seconds: 8e9)
    # CPU: the run's forced host devices share one measured rate
    assert metrics.device_peak() == (8e9, "measured")
    assert metrics.device_peak(sharing=8) == (1e9, "measured")
    with pytest.raises(ConfigError, match="peak_flops"):
        TrainConfig(peak_flops=-1.0)


def test_cpu_mfu_does_not_grow_with_forced_devices(monkeypatch):
    """The same machine's throughput over 1 or 8 forced host devices: one MFU."""
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.config import MeshConfig
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype, seconds: 8e9)
    figures = []
    for n in (1, 8):
        total, local = metrics.mesh_devices(make_mesh(MeshConfig(devices=n)))
        assert (total, local) == (n, n)
        peak, _ = metrics.device_peak(sharing=local)
        figures.append(metrics.mfu(1000.0, 1e6, total, peak))
    assert figures[0] == pytest.approx(figures[1]) == pytest.approx(1000.0 * 1e6 / 8e9)
    assert jax.device_count() == 8


def test_flops_per_token_counts_causal_attention_half():
    """MaxText's count: 6 * matmul params + 12 * L * S * H * hd, halved when causal."""
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    params = 2 * (32 * 8 * (4 * 2 + 2 * 2) + 3 * 32 * 64) + 32 * 100
    attn = 12 * 2 * 128 * 4 * 8
    assert model_flops_per_token(cfg, 128) == pytest.approx(6 * params + attn / 2)
    enc = dataclasses.replace(cfg, family="encoder")
    assert model_flops_per_token(enc, 128) == pytest.approx(6 * params + attn)


def test_metrics_log_writes_tensorboard_scalars(tmp_path):
    """Scalars at their steps, vectors (per-expert load) as key/i, strings skipped."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    import numpy as np
    log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), str(tmp_path))
    log.write({"step": 3, "loss": np.float32(2.5), "expert_load": np.array([0.25, 0.75]),
               "note": "x"})
    log.write({"step": 4, "eval_loss": 2.0, "skipped_steps": 1})
    log.close()
    events = accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)]
               for t in events.Tags()["scalars"]}
    assert scalars == {"loss": [(3, 2.5)], "expert_load/0": [(3, 0.25)],
                       "expert_load/1": [(3, 0.75)], "eval_loss": [(4, 2.0)],
                       "skipped_steps": [(4, 1.0)]}
