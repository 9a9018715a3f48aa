"""Outputs of a run: the terminal table, the JSON document (schema in docs/benchmarks.md) and
the plot of time vs tokens per provider."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

SCHEMA = "lora_triton.bench/1"
_TOP_KEYS = {"schema": str, "suite": str, "date": str, "command": str, "device": dict, "versions": dict,
             "ceilings": dict, "cases": list, "results": list, "skipped": list}
_RESULT_KEYS = {"case": str, "series": str, "suite": str, "op": str, "provider": str, "mode": str, "shape": dict,
                "dtype": str, "dropout_p": (int, float), "device": str, "stats": dict, "cuda_graph": bool,
                "model": dict, "tflops": (int, float), "gbps": (int, float)}
_STATS_KEYS = ("median_s", "p20_s", "p80_s", "mean_s", "min_s", "max_s", "n")
_NULLABLE = ("ratio_to_base", "ratio_to_unfused", "roofline_fraction", "memory")
# p20..p80 wider than this fraction of the median: the samples disagree, the median is not to be trusted.
SPREAD_WARN = 0.10


def load_warnings(doc: dict) -> list[str]:
    """Why this run's numbers may be disturbed: a 1-minute load average above the core count at the start
    or end (other work competing for the cores), or providers whose p20..p80 spread is wide."""
    out = []
    cores = (doc.get("device") or {}).get("cpu_count")
    for key, when in (("load_average", "start"), ("load_average_end", "end")):
        load = doc.get(key)
        if cores and load and load[0] > cores:
            out.append(f"machine loaded at the {when}: 1-min load average {load[0]:.2f} > {cores} cores")
    wide = []
    for r in doc.get("results", []):
        st = r["stats"]
        spread = (st["p80_s"] - st["p20_s"]) / st["median_s"] if st["median_s"] > 0 else 0.0
        if spread > SPREAD_WARN:
            wide.append(f"{r['case']} {r['provider']} ({100 * spread:.0f}%)")
    if wide:
        out.append(f"p20..p80 wider than {100 * SPREAD_WARN:.0f}% of the median: " + ", ".join(wide))
    return out


def build_document(suite: str, meta: dict, ceilings: dict, cases: list, records: list, skipped: list) -> dict:
    doc = {"schema": SCHEMA, "suite": suite, **meta,
           "ceilings": {dt: c.to_dict() for dt, c in ceilings.items()},
           "cases": [c.to_dict() for c in cases], "results": records, "skipped": skipped}
    doc["derived"] = derived(records)
    doc["warnings"] = load_warnings(doc)
    validate_document(doc)
    return doc


def derived(records: list[dict]) -> list[dict]:
    """Cross-case ratios: a mixed-rank batch vs the same batch at the mean rank, per provider."""
    by = {(tuple(r["tags"]), r["label"], r["shape"]["tokens"], r["provider"]): r for r in records}
    out = []
    for (tags, label, tokens, provider), rec in by.items():
        mean = by.get((("mean-rank",), label, tokens, provider))
        if tags == ("mixed",) and mean is not None:
            out.append({"name": "mixed_rank_over_mean_rank", "provider": provider, "case": rec["case"],
                        "value": rec["stats"]["median_s"] / mean["stats"]["median_s"]})
    return out


def validate_document(doc: dict) -> None:
    """Raises ValueError listing every schema violation (keys, types, statistics order)."""
    errors = []
    for key, typ in _TOP_KEYS.items():
        if not isinstance(doc.get(key), typ):
            errors.append(f"top-level {key!r} must be {typ.__name__}")
    if doc.get("schema") != SCHEMA:
        errors.append(f"schema must be {SCHEMA!r}")
    if "git_revision" not in doc:
        errors.append("top-level 'git_revision' missing (null if unknown)")
    for i, rec in enumerate(doc.get("results") or []):
        for key, typ in _RESULT_KEYS.items():
            if not isinstance(rec.get(key), typ):
                errors.append(f"results[{i}].{key} missing or wrong type")
        for key in _NULLABLE:
            if key not in rec:
                errors.append(f"results[{i}].{key} missing (null if not applicable)")
        st = rec.get("stats") or {}
        if any(k not in st for k in _STATS_KEYS):
            errors.append(f"results[{i}].stats needs {_STATS_KEYS}")
        elif not st["min_s"] <= st["p20_s"] <= st["median_s"] <= st["p80_s"] <= st["max_s"]:
            errors.append(f"results[{i}].stats not ordered min <= p20 <= median <= p80 <= max")
    for i, s in enumerate(doc.get("skipped") or []):
        if not all(isinstance(s.get(k), str) for k in ("case", "provider", "reason")):
            errors.append(f"skipped[{i}] needs case, provider, reason strings")
    if errors:
        raise ValueError("invalid benchmark document: " + "; ".join(errors))


def write_json(doc: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def load_json(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    validate_document(doc)
    return doc


def _time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _opt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _mem(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['bytes'] / 2**20:.2f}" + (" saved" if m["kind"] == "saved_for_backward" else " peak")


def format_table(doc: dict, compact: bool = False) -> str:
    """One block per case; providers as rows. ``compact`` drops p20/p80, min, GB/s and memory.
    The min is shown because on a shared machine it is the least disturbed sample."""
    head = ["provider", "median", "p20..p80", "min", "x base", "x unfused", "TFLOP/s", "GB/s", "roofline", "MiB"]
    if compact:
        head = ["provider", "median", "x base", "x unfused", "TFLOP/s", "roofline"]
    by_case = defaultdict(list)
    for rec in doc["results"]:
        by_case[rec["case"]].append(rec)
    dev = doc["device"]
    lines = [f"device: {dev.get('name')} ({dev.get('type')}) | date {doc['date']} | torch "
             f"{doc['versions'].get('torch')} | git {doc.get('git_revision')}"]
    load, load_end = doc.get("load_average"), doc.get("load_average_end")
    if load or load_end:
        fmt = lambda v: "?" if not v else "/".join(f"{x:.2f}" for x in v)
        lines.append(f"load average (1/5/15 min): {fmt(load)} at start, {fmt(load_end)} at end, "
                     f"{dev.get('cpu_count')} cores")
    for w in doc["warnings"] if "warnings" in doc else load_warnings(doc):  # not recomputed when stored
        lines.append(f"WARNING: {w}")
    for dt, c in doc["ceilings"].items():
        lines.append(f"ceilings {dt}: {c['flops_per_s'] / 1e12:.2f} TFLOP/s matmul, "
                     f"{c['bytes_per_s'] / 1e9:.1f} GB/s copy")
    for case, recs in by_case.items():
        r0 = recs[0]
        lines.append("")
        lines.append(f"{case}  [{r0['op']} {r0['dtype']} {_shape_text(r0['shape'])}]")
        rows = []
        for r in recs:
            s = r["stats"]
            full = [r["provider"] + (" (graph)" if r["cuda_graph"] else ""), _time(s["median_s"]),
                    f"{_time(s['p20_s'])}..{_time(s['p80_s'])}", _time(s["min_s"]), _opt(r["ratio_to_base"], ".3f"),
                    _opt(r["ratio_to_unfused"], ".3f"), f"{r['tflops']:.3f}", f"{r['gbps']:.1f}",
                    _opt(r["roofline_fraction"] and 100 * r["roofline_fraction"], ".1f") + "%", _mem(r["memory"])]
            rows.append([full[i] for i in (0, 1, 4, 5, 6, 8)] if compact else full)
        lines += _align([head, *rows])
    for d in doc.get("derived", []):
        lines.append(f"{d['name']} ({d['provider']}, {d['case']}): {d['value']:.3f}")
    if doc["skipped"]:
        lines.append("")
        lines.append("skipped:")
        seen = set()
        for s in doc["skipped"]:
            key = (s["provider"], s["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"  {s['provider']}: {s['reason']} (e.g. {s['case']})")
    return "\n".join(lines)


def _shape_text(shape: dict) -> str:
    t = f"T={shape['tokens']} K={shape['in_features']} N={shape['out_features']} r={shape['rank']}"
    if shape.get("adapters", 1) > 1 or "batch" in shape:
        t += f" adapters={shape['adapters']} batch={shape.get('batch')}x{shape.get('seq_len')}"
    return t


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def plot(doc: dict, path: str | Path, max_panels: int = 12) -> None:
    """Median time vs tokens per provider (p20..p80 as error bars), one panel per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    series = defaultdict(lambda: defaultdict(list))
    for r in doc["results"]:
        series[r["series"]][r["provider"]].append((r["shape"]["tokens"], r["stats"], r))
    names = list(series)[:max_panels]
    cols = min(3, max(1, math.ceil(math.sqrt(len(names)))))  # 4 panels: 2 x 2, no empty cells
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for provider, pts in sorted(series[name].items()):
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            med = [p[1]["median_s"] * 1e3 for p in pts]
            err = [[m - p[1]["p20_s"] * 1e3 for m, p in zip(med, pts)],
                   [p[1]["p80_s"] * 1e3 - m for m, p in zip(med, pts)]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=provider)
        first = next(iter(series[name].values()))[0][2]
        shape = first["shape"]
        ax.set_title(f"{name}\n[{first['dtype']}, K={shape['in_features']} N={shape['out_features']}]", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({p[0] for pts in series[name].values() for p in pts}))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))  # token counts, not powers of 2
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1-2-5 ms ticks, labelled
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens per call (M)")
        ax.set_ylabel("time per call, ms (median; bars p20..p80)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    load = doc.get("load_average")
    fig.suptitle(f"{doc['suite']} on {doc['device'].get('name')} ({doc['device'].get('type')}, "
                 f"{doc['device'].get('threads')} threads), {doc['date'][:16]}"
                 + (f", load {load[0]:.1f}" if load else ""), fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
