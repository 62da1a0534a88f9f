"""benchmarks/gpu_check.sh's Python parts in their dry-run form (tiny shapes on
CPU), merged by benchmarks/gpu_report.py: the one JSON holds every part and
every target, with the numbers each part reports. The speed itself is measured
on a GPU (BENCHMARKS.md, GPU); `bash benchmarks/gpu_check.sh --dry-run` runs the
whole script, kernel tests and all impls included, in a few minutes."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import attention_gpu  # noqa: E402
import benchlib  # noqa: E402
import decode_gpu  # noqa: E402
import gpu_report  # noqa: E402
import train_gpu  # noqa: E402

TRAIN_KEYS = {"tokens_per_s", "step_s", "tflops_per_device", "mfu_datasheet", "mfu_measured",
              "datasheet_peak_tflops", "measured_peak_tflops", "params", "flops_per_token"}
DECODE_KEYS = {"step_ms", "tokens_per_s", "bytes_per_step", "gbps", "mbu", "weight_bytes"}


def _write(work, name, data, rc=0):
    benchlib.write_json(os.path.join(work, f"{name}.json"), data)
    with open(os.path.join(work, f"{name}.status"), "w") as f:
        json.dump({"rc": rc, "seconds": 1, "timeout_s": 10}, f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The cheapest impl of each part for real; cuDNN fails on CPU (recorded);
    the kernel tests' part is a junit file; one decode part never ran."""
    work = str(tmp_path_factory.mktemp("gpu_check"))
    _write(work, "env", {**benchlib.device_info(), "dry_run": True})
    att = attention_gpu.run("dry", 1, flash_impls=("cudnn", "xla"), decode_impls=("xla",))
    _write(work, "attention", {**benchlib.device_info(), **att})
    row = train_gpu.run("xla", 1, dry=True)
    for impl in gpu_report.TRAIN_IMPLS:
        _write(work, f"train_{impl}", {**row, "impl": impl})
    _write(work, "train_cudnn", train_gpu.run("cudnn", 1, dry=True))
    _write(work, "decode_auto", decode_gpu.run("xla", [1], dry=True))
    with open(os.path.join(work, "kernel_tests.xml"), "w") as f:
        f.write('<testsuite><testcase classname="t" name="ok"/><testcase classname="t" name="bad">'
                '<failure message="AssertionError: off by 1e-2">trace</failure></testcase>'
                '<testcase classname="t" name="tpu"><skipped/></testcase></testsuite>')
    with open(os.path.join(work, "decode_pallas.status"), "w") as f:
        json.dump({"rc": 124, "seconds": 45, "timeout_s": 45}, f)
    with open(os.path.join(work, "decode_pallas.log"), "w") as f:
        f.write('compiling\n{"batch": 1, "mbu": 0.5}\n')
    out = os.path.join(work, "gpu.json")
    gpu_report.main([work, out])
    with open(out) as f:
        return json.load(f)


def test_report_has_every_part_and_target(report):
    assert set(report["parts"]) == set(gpu_report.PARTS)
    assert set(report["targets"]) == set(gpu_report.TARGETS)
    assert report["device"] == "cpu" and report["dry_run"] is True
    for t in report["targets"].values():
        assert {"target", "measured", "met", "what"} <= set(t)


def test_parts_report_their_numbers(report):
    parts = report["parts"]
    rows = parts["attention"]["rows"]
    flash = [r for r in rows if r["kind"] == "flash" and r["impl"] == "xla"]
    decode = [r for r in rows if r["kind"] == "decode"]
    assert flash and {"fwd_tflops", "fwd_bwd_tflops", "max_abs_err"} <= set(flash[0])
    assert decode and {"gbps", "hbm_fraction"} <= set(decode[0])
    assert parts["attention"]["copy_bandwidth_gbps"] > 0
    cudnn = [r for r in rows if r["kind"] == "flash" and r["impl"] == "cudnn"]
    assert "needs a GPU" in cudnn[0]["error"]
    assert TRAIN_KEYS <= set(parts["train_xla"]) and parts["train_xla"]["tokens_per_s"] > 0
    assert parts["train_xla"]["mfu_datasheet"] is None  # CPU: no datasheet peak
    assert "needs a GPU" in parts["train_cudnn"]["error"]
    assert DECODE_KEYS <= set(parts["decode_auto"]["rows"][0])


def test_failures_are_recorded_not_fatal(report):
    k = report["parts"]["kernel_tests"]
    assert (k["passed"], k["failed"], k["skipped"]) == (1, 1, 1)
    assert k["failures"] == [{"test": "t::bad", "message": "AssertionError: off by 1e-2"}]
    timed_out = report["parts"]["decode_pallas"]
    assert timed_out["error"].startswith("timed out") and timed_out["rows"] == [
        {"batch": 1, "mbu": 0.5}]
    # the batch-1 MBU target takes the best decode part: the salvaged row or the real
    # dry-run row, whichever is higher on this machine
    real = [r["mbu"] for r in report["parts"]["decode_auto"]["rows"] if r["batch"] == 1]
    assert report["targets"]["decode_b1_mbu"]["measured"] == pytest.approx(max([0.5] + real))


def test_kernel_tests_cut_short_keep_their_verbose_outcomes(tmp_path):
    work = str(tmp_path)
    with open(os.path.join(work, "kernel_tests.status"), "w") as f:
        json.dump({"rc": 124, "seconds": 90, "timeout_s": 90}, f)
    with open(os.path.join(work, "kernel_tests.log"), "w") as f:
        f.write("tests/test_kernels.py::test_a[x] PASSED [ 1%]\n"
                "tests/test_kernels.py::test_b FAILED [ 2%]\n"
                "tests/test_kernels_tpu.py::test_c SKIPPED (the TPU lowering) [ 3%]\n")
    k = gpu_report.part(work, "kernel_tests")
    assert k["error"].startswith("timed out")
    assert (k["passed"], k["failed"], k["skipped"]) == (1, 1, 1)
    assert k["failures"] == [{"test": "tests/test_kernels.py::test_b", "message": "FAILED"}]
