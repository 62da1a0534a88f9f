"""Merge the parts of benchmarks/gpu_check.sh into one JSON and judge the targets.

    python benchmarks/gpu_report.py WORK_DIR OUT.json

WORK_DIR holds, per part NAME: NAME.json (what the part wrote), NAME.status
({"rc", "seconds", "timeout_s"} from the shell) and NAME.log (its output). A part
that left no JSON gets {"error": ..., "log_tail": ...}; one that timed out keeps
the rows it printed as JSON lines. The kernel tests' junit XML becomes counts and
the failing tests' names and first lines.
"""

from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET

TRAIN_IMPLS = ("pallas", "cudnn", "xla")
DECODE_IMPLS = ("auto", "pallas")
PARTS = ("env", "kernel_tests", "attention", *(f"train_{i}" for i in TRAIN_IMPLS),
         *(f"decode_{i}" for i in DECODE_IMPLS))
TARGETS = {  # name: (threshold, what it is)
    "flash_fwd_bwd_vs_cudnn_seq_ge_4k": (0.90, "min over seq >= 4096 of pallas / cudnn fwd+bwd"),
    "decode_attention_hbm_fraction_cache_ge_8k": (
        0.70, "min over cache >= 8192 (all batches) of pallas decode GB/s / copy bandwidth"),
    "train_mfu_1b": (0.50, "best train MFU (datasheet peak) over the impls"),
    "decode_b1_mbu": (0.70, "best batch-1 decode memory-bandwidth utilisation"),
}


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _json_lines(text: str) -> list:
    rows = []
    for line in (text or "").splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def junit_summary(path: str) -> dict:
    """Counts and failures from pytest's --junitxml file."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name', '')}"
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        if bad is not None:
            out["failed" if bad.tag == "failure" else "errors"] += 1
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            out["failures"].append({"test": name, "message": (msg[0] if msg else "")[:300]})
        elif c.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def verbose_summary(log: str) -> dict:
    """Counts from `pytest -v` lines (a run stopped before writing its XML)."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for test, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", log, re.M):
        key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors"}
        out[key[outcome]] += 1
        if outcome in ("FAILED", "ERROR"):
            out["failures"].append({"test": test, "message": outcome})
    return out


def part(work: str, name: str) -> dict:
    status = json.loads(_read(os.path.join(work, f"{name}.status")) or "{}")
    log = _read(os.path.join(work, f"{name}.log")) or ""
    data = None
    if name == "kernel_tests" and os.path.exists(os.path.join(work, "kernel_tests.xml")):
        try:
            data = junit_summary(os.path.join(work, "kernel_tests.xml"))
        except ET.ParseError as e:
            data = {"error": f"junit XML unreadable: {e}"}
    elif _read(os.path.join(work, f"{name}.json")):
        data = json.loads(_read(os.path.join(work, f"{name}.json")))
    if data is None:
        if not status:
            data = {"error": "not run"}
        else:
            why = ("timed out" if status.get("rc") in (124, 137)
                   else f"exited {status.get('rc')}")
            data = {"error": f"{why} after {status.get('seconds')} s, no result file"}
            rows = _json_lines(log)
            if rows:
                data["rows"] = rows  # what it printed before it stopped
            if name == "kernel_tests":
                data.update(verbose_summary(log))
    if "error" in data or status.get("rc"):
        data["log_tail"] = log[-3000:]
    return {**data, "status": status}


def _min(values):
    values = [v for v in values if v is not None]
    return min(values) if values else None


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def targets(parts: dict) -> dict:
    rows = parts["attention"].get("rows", [])
    measured = {
        "flash_fwd_bwd_vs_cudnn_seq_ge_4k": _min(
            r.get("vs_cudnn") for r in rows
            if r.get("kind") == "flash" and r.get("impl") == "pallas" and r.get("seq", 0) >= 4096),
        "decode_attention_hbm_fraction_cache_ge_8k": _min(
            r.get("hbm_fraction") for r in rows
            if r.get("kind") == "decode" and r.get("impl") == "pallas"
            and r.get("cache_len", 0) >= 8192),
        "train_mfu_1b": _max(parts[f"train_{i}"].get("mfu_datasheet") for i in TRAIN_IMPLS),
        "decode_b1_mbu": _max(r.get("mbu") for i in DECODE_IMPLS
                              for r in parts[f"decode_{i}"].get("rows", []) if r.get("batch") == 1),
    }
    return {k: {"target": t, "what": what, "measured": measured[k],
                "met": None if measured[k] is None else measured[k] >= t}
            for k, (t, what) in TARGETS.items()}


def report(work: str) -> dict:
    parts = {name: part(work, name) for name in PARTS}
    env = parts["env"]
    return {"device": env.get("device"), "jax": env.get("jax"), "date": env.get("date"),
            "dry_run": env.get("dry_run"), "targets": targets(parts), "parts": parts}


def summary_lines(result: dict) -> list[str]:
    out = [f"device {result['device']}, jax {result['jax']}, {result['date']}"
           f"{' (dry run)' if result['dry_run'] else ''}"]
    for name, p in result["parts"].items():
        st = p.get("status", {})
        out.append(f"  {name:<14} rc={st.get('rc')} {st.get('seconds')} s"
                   + (f"  ERROR {p['error']}" if "error" in p else ""))
    for name, t in result["targets"].items():
        m = t["measured"]
        out.append(f"  target {name}: {'-' if m is None else f'{m:.3f}'} vs {t['target']}"
                   f" -> {t['met']}")
    return out


def main(argv=None) -> int:
    work, out = (argv or sys.argv[1:])[:2]
    result = report(work)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print("\n".join(summary_lines(result)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
