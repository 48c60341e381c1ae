"""Summarise benchmark JSON records: ``python -m fastmim.bench.summary DIR_OR_FILES...``.

Prints one markdown table for step records (img/s, ms/step, speedup, MFU, memory), one for kernel records (each
provider's median ms and speedup over the reference) and one for data records (loader CPU cost, cores per node,
bytes, pixel deviation per source, storage and decode mode), each line naming its GPU (or device) and record. The README
results table is pasted from this output, so it only ever quotes committed JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load_records(paths: list[Path]) -> list[dict]:
    files = [f for p in paths for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    return [{**json.loads(f.read_text()), "_file": f.name} for f in files]


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def step_table(records: list[dict]) -> list[str]:
    head = (
        "model",
        "impl",
        "batch",
        "dtype",
        "img/s",
        "ms/step",
        "x reference",
        "MFU",
        "peak GiB",
        "compile s",
        "GPU",
        "torch",
        "file",
    )
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    choices = []
    for rec in records:
        if rec.get("bench") != "step":
            continue
        for r in rec["rows"]:
            if "img_per_s" not in r:  # failed, or cut before it finished (the record is written row by row)
                what = f"**{r.get('status', '?')}**" + (f": {r['error']}" if r.get("error") else "")
                lines.append(f"| {r['model']} | {r['impl']} | {what} |" + " |" * (len(head) - 4) + f" {rec['_file']} |")
                continue
            lines.append(
                f"| {r['model']} | {r['impl']} | {r['batch']} | {r['dtype']} | {r['img_per_s']:.0f} | "
                f"{r['ms_per_step']:.2f} | {_fmt(r.get('speedup_vs_reference'), '.2f')} | {_fmt(r.get('mfu'), '.1%')} "
                f"| {_fmt(r.get('peak_mem_gib'), '.1f')} | {_fmt(r.get('compile_s'), '.0f')} | {rec['gpu']} | "
                f"{rec['torch']} | {rec['_file']} |"
            )
            if r.get("attn") and (r["model"], r["attn"]) not in {c[:2] for c in choices}:
                choices.append((r["model"], r["attn"], rec["gpu"]))
    if len(lines) == 2:
        return []
    # model.attn=auto's choice per attention shape, once per model and card (the rows of one record share it)
    return lines + ["", *(f"- attention, {model} on {gpu}: {attn}" for model, attn, gpu in choices)]


def kernel_table(records: list[dict]) -> list[str]:
    lines = [
        "| bench | provider | mode | shape | dtype | ms (p50) | GB/s | x reference | GPU | torch | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        if rec.get("bench") in ("step", "data"):
            continue
        for r in rec.get("rows", []):  # records without kernel rows (e.g. the convergence check) are skipped
            if "ms_p50" not in r or "provider" not in r:
                continue
            shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
            lines.append(
                f"| {rec['bench']} | {r['provider']} | {r['mode']} | {shape} | {r['dtype']} | {r['ms_p50']:.3f} | "
                f"{_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('speedup'), '.2f')} | {rec['gpu']} | {rec['torch']} | "
                f"{rec['_file']} |"
            )
    return lines if len(lines) > 2 else []


def data_table(records: list[dict]) -> list[str]:
    lines = [
        "| source | storage | decode | augment | CPU s / 1,000 img | img/s per core | cores per 8-GPU node | "
        "bytes / image | pixel diff mean / max | device | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        if rec.get("bench") != "data":
            continue
        for r in rec["rows"]:
            if "storage" not in r:  # records from before decode modes and storages were measured
                continue
            lines.append(
                f"| {r['source']} | {r['storage']} | {r['decode']} | {r['augment']} | {r['cpu_s_per_1k_img']:.3f} | "
                f"{_fmt(r.get('img_per_s_per_core'), '.0f')} | {r['cores_per_8gpu_node']:.0f} | "
                f"{_fmt(r.get('bytes_per_image'), ',.0f')} | {r['pixel_diff_mean']:.2f} / {r['pixel_diff_max']:.0f} | "
                f"{r['augment_device']} | {rec['_file']} |"
            )
    return lines if len(lines) > 2 else []


def unfinished_kernel_rows(records: list[dict]) -> list[str]:
    """Kernel rows that failed their correctness gate or were still running when the record was last written."""
    lines = []
    for rec in records:
        if rec.get("bench") in ("step", "data"):
            continue
        for r in rec.get("rows", []):
            if "provider" in r and (r.get("ok") is False or r.get("status") == "running"):
                shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
                why = r.get("error") or "did not finish (still running when the process ended)"
                lines.append(f"- {rec['bench']} {r['provider']} {r['mode']} {shape}: {why} ({rec['_file']})")
    return ["Kernel rows not measured:", *lines] if lines else []


def summarize(paths: list[Path]) -> str:
    records = load_records(paths)
    parts = [step_table(records), kernel_table(records), unfinished_kernel_rows(records), data_table(records)]
    return "\n\n".join("\n".join(p) for p in parts if p) or "no benchmark records found"


if __name__ == "__main__":
    print(summarize([Path(p) for p in sys.argv[1:]] or [Path("benchmarks/results")]))
