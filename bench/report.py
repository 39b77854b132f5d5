"""Turn the benchmarks' JSON in results/ into results/report.md with PNG plots.

    .venv/bin/python bench/report.py [--results results]

Reads whatever is there (e2e_*.json, index_bench*.json, user_bench.json, candidate_bench.json) and
skips what is missing, so it can follow any subset of `make bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v: object, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def e2e_section(runs: list[dict], out: Path) -> list[str]:
    lines = ["## End to end: gateway Retrieve through the three-service stack", ""]
    for run in runs:
        tag = f"{run['corpus']} ({run.get('device', '?')})"
        m = run.get("machine", {})
        lines += [f"### {tag}", "", run["description"], "",
                  f"Machine: {m.get('cpu')} x{m.get('cpus')}, GPU {m.get('gpu')}, torch {m.get('torch')}, "
                  f"grpc {m.get('grpc')}, load avg at start {_fmt(m.get('loadavg_1m'))}. "
                  f"Stack start-up {run.get('startup_s')} s. Command: `{run.get('command')}`", "",
                  "| concurrency | QPS | p50 ms | p90 ms | p99 ms | errors | user batch | gateway batch "
                  "| baseline p50 ms | baseline ceiling QPS | CPU ms/request (gw / user / client) |",
                  "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
        base = {b["concurrency"]: b for b in run["baseline"]}
        for lv in run["levels"]:
            b, bl, cpu = lv["breakdown"], base.get(lv["concurrency"], {}), lv.get("cpu_ms_per_request", {})
            errors = ", ".join(f"{k} {v}" for k, v in lv["errors"].items()) or "0"
            cpus = " / ".join(
                _fmt(cpu.get(k)) for k in ("retrieval_gateway", "user_service", "load generator")
            )
            lines.append(f"| {lv['concurrency']} | {lv['qps']:.1f} | {lv['p50_ms']:.2f} | "
                         f"{lv['p90_ms']:.2f} | {lv['p99_ms']:.2f} | {errors} | "
                         f"{_fmt(b['user_batch_mean'], 1)} | "
                         f"{_fmt(b['gateway_batch_mean'], 1)} | {_fmt(bl.get('p50_ms'))} | "
                         f"{_fmt(bl.get('qps'), 0)} | {cpus} |")  # fmt: skip
        stages = list(run["levels"][0]["breakdown"]["stages_ms"])
        lines += ["", "Where a request's time goes (mean ms, from the services' metrics):", "",
                  "| concurrency | " + " | ".join(stages) + " | client mean |",
                  "|---:|" + "---:|" * (len(stages) + 1)]  # fmt: skip
        for lv in run["levels"]:
            st = lv["breakdown"]["stages_ms"]
            lines.append(f"| {lv['concurrency']} | " + " | ".join(_fmt(v) for v in st.values())
                         + f" | {lv['mean_ms']:.2f} |")  # fmt: skip
        lines += ["", "Memory (RSS, MiB, over the measured levels):", "",
                  "| process | first | last | max | growth % |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in run["rss"].items():
            lines.append(
                f"| {name} | {r['first_mib']} | {r['last_mib']} | {r['max_mib']} | {r['growth_pct']} |"
            )
        lines += ["", "Targets:", "", "| target | value | bound | met |", "|---|---:|---|---|"]
        for name, t in run.get("targets", {}).items():
            lines.append(f"| {name} | {t['value']} | {t['bound']} | {'yes' if t['met'] else '**no**'} |")
        lines.append("")
        stem = f"e2e_{run['corpus']}_{run.get('device', 'cpu')}"
        _plot_e2e(run, out / f"{stem}.png")
        lines += [f"![{tag}]({stem}.png)", ""]
    return lines


def _plot_e2e(run: dict, path: Path) -> None:
    levels, base = run["levels"], {b["concurrency"]: b for b in run["baseline"]}
    cs = [lv["concurrency"] for lv in levels]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for p in ("p50", "p90", "p99"):
        ax[0].plot(cs, [lv[f"{p}_ms"] for lv in levels], marker="o", label=f"stack {p}")
    ax[0].plot(cs, [base.get(c, {}).get("p50_ms") for c in cs], "k--", marker="x", label="in-process p50")
    ax[0].set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="latency")
    ax[1].plot(cs, [lv["qps"] for lv in levels], marker="o", label="stack")
    ax[1].plot(cs, [base.get(c, {}).get("qps") for c in cs], "k--", marker="x", label="in-process ceiling")
    ax[1].set(xscale="log", xlabel="concurrency", ylabel="requests/s", title="throughput")
    stages = list(levels[0]["breakdown"]["stages_ms"])
    bottom = [0.0] * len(cs)
    for stage in stages:
        vals = [lv["breakdown"]["stages_ms"][stage] or 0.0 for lv in levels]
        ax[2].bar([str(c) for c in cs], vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax[2].set(yscale="log", xlabel="concurrency", ylabel="mean ms", title="where the time goes")
    samples = run.get("rss_samples", [])
    for name in ("retrieval_gateway", "gateway", "user_service", "candidate_service"):
        pts = [(s["t"], s[name] / 2**20) for s in samples if s.get(name)]
        if pts:
            ax[3].plot(*zip(*pts, strict=True), label=name)
    ax[3].set(xlabel="seconds", ylabel="RSS MiB", title="memory")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle(f"{run['corpus']} on {run.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def index_section(data: dict, name: str, out: Path) -> list[str]:
    cfg = data["config"]
    lines = [f"## Retrieval step: exact top-k vs FAISS ({name})", "",
             f"{cfg['n']:,} x {cfg['dim']}, k={cfg['k']}, {cfg['device']}, {cfg['threads']} threads", "",
             "| method | B | ms/batch | queries/s | recall@k |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in data["rows"]:
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['ms_median']:.2f} | {r['qps']:.0f} | "
            f"{_fmt(r['recall'], 4)} |"
        )
    lines += [""] + [f"- {k}: {v:.2f}x" for k, v in data.get("ratios", {}).items()] + [""]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['method']} B={r['batch']}" for r in data["rows"]]
    ax.barh(labels, [r["ms_median"] for r in data["rows"]],
            color=["tab:orange" if "faiss" in r["method"] else "tab:blue" for r in data["rows"]])  # fmt: skip
    ax.set(xscale="log", xlabel="ms per batch (median)", title=f"exact top-{cfg['k']} over {cfg['n']:,} rows")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=90)
    plt.close(fig)
    return [*lines, f"![{name}]({name}.png)", ""]


def generic_section(title: str, data: dict) -> list[str]:
    """Component benchmarks with their own table printers: their rows, as JSON lines."""
    rows = data.get("rows", [])
    lines = [f"## {title}", ""]
    if rows:
        keys = list(rows[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    for key in ("on_off_ratio", "ratios", "targets"):
        if key in data:
            lines += ["", f"{key}: `{json.dumps(data[key])}`"]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=REPO / "results")
    args = p.parse_args(argv)
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark report", "", "Generated by `bench/report.py` from the JSON in this directory.", ""]
    runs = [d for f in sorted(out.glob("e2e_*.json")) if (d := _load(f)) and "levels" in d]
    if runs:
        lines += e2e_section(runs, out)
    for f in sorted(out.glob("index_bench*.json")):
        if (d := _load(f)) and "rows" in d:
            lines += index_section(d, f.stem, out)
    for stem, title in (("user_bench", "user_service batching"), ("candidate_bench", "candidate_service")):
        if d := _load(out / f"{stem}.json"):
            lines += generic_section(title, d)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
