"""Helpers of bench/gpu_check.sh (stdlib only at import: they must run when torch or grpc is broken).

    python3 bench/gpu_check.py prepare             # here, before a GPU run: fresh twotower/, .whl/ complete
    python3 bench/gpu_check.py protos [--regenerate] # is twotower/ generated from the current protos?
    python3 bench/gpu_check.py env --device cuda --txt OUT/env.txt --json WORK/env.json
    python3 bench/gpu_check.py summary --out OUT --work WORK --device cuda [--quick]

The GPU machine has Python 3.12 with a CUDA build of torch and no package registry: what the project
needs beyond its image travels as wheels in the ignored folder .whl/ (installed with --target, then put
first on PYTHONPATH) and as the generated package twotower/ (grpc_tools is not there to regenerate
it). `prepare` makes both ready; `protos` tells on the GPU machine whether twotower/ matches protos/
(a hash written at generation); `summary` turns the steps' results into gpu_check.json, report.md and
the table printed last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere (env imports twotower)
PROTOS = REPO / "protos"
GENERATED = REPO / "twotower"
HASH_FILE = GENERATED / ".protos.sha256"
WHEELS = REPO / ".whl"
# The runtime packages the image lacks or has at another version, as pinned in constraints.txt; grpcio
# and protobuf must be exactly the pair the generated code was made for (grpcio-tools' versions).
# py-spy (a binary in its wheel) is for bench/spy_stack.py's step.
CARRIED = ("grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "threadpoolctl", "py-spy")
PY_TAG = "cp312"  # the GPU image's Python 3.12
# The targets on an H100/H200 (10M x 64 bf16, k=1000; end to end c=1).
INDEX_TARGETS = {1: 1.0, 32: 3.0}  # batch -> ms
RECALL_TARGET = 0.99
E2E_C1_P50_MS = 3.0


# ---- twotower/ --------------------------------------------------------------------------------------
def protos_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(PROTOS.rglob("*.proto")):
        h.update(str(path.relative_to(PROTOS)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def protos_status() -> tuple[str, str]:
    """('fresh' | 'stale' | 'unknown' | 'missing', message)."""
    if not (GENERATED / "v1").is_dir():
        return "missing", "twotower/ is missing: run `bench/gpu_check.sh --prepare` (or make proto) first"
    if not HASH_FILE.is_file():
        return (
            "unknown",
            "twotower/ has no .protos.sha256 (made by make proto?): cannot tell if it is current",
        )
    if HASH_FILE.read_text().strip() != protos_hash():
        return "stale", "twotower/ was generated from other protos: run `bench/gpu_check.sh --prepare` here"
    return "fresh", "twotower/ matches protos/"


def regenerate(python: str) -> None:
    """protoc into a temporary folder, then swap it in (others may be importing twotower meanwhile)."""
    sources = [str(p.relative_to(REPO)) for p in sorted(PROTOS.rglob("*.proto"))]
    tmp = Path(tempfile.mkdtemp(prefix=".twotower-", dir=REPO))
    try:
        subprocess.run(
            [
                python,
                "-m",
                "grpc_tools.protoc",
                "-Iprotos",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *sources,
            ],
            cwd=REPO,
            check=True,
        )
        for init in ("twotower/__init__.py", "twotower/v1/__init__.py", "twotower/.generated"):
            (tmp / init).touch()
        (tmp / "twotower" / ".protos.sha256").write_text(protos_hash() + "\n")
        old = REPO / f".twotower-old-{os.getpid()}"
        if GENERATED.exists():
            GENERATED.rename(old)
        (tmp / "twotower").rename(GENERATED)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def has_grpc_tools(python: str) -> bool:
    return subprocess.run([python, "-c", "import grpc_tools.protoc"], capture_output=True).returncode == 0


def cmd_protos(args: argparse.Namespace) -> int:
    status, message = protos_status()
    if status != "fresh" and args.regenerate and has_grpc_tools(args.python):
        regenerate(args.python)
        status, message = protos_status()
        message = f"regenerated: {message}"
    print(f"protos: {status}: {message}")
    return 0 if status == "fresh" else 1


# ---- .whl/ ------------------------------------------------------------------------------------------
def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels_present() -> dict[str, list[str]]:
    """{normalised name: [versions]} of the wheels in .whl/ that a cp312 manylinux x86_64 can install."""
    found: dict[str, list[str]] = {}
    for whl in sorted(WHEELS.glob("*.whl")):
        parts = whl.name[:-4].split("-")  # name-version(-build)?-python-abi-platform
        py, platform_tag = parts[-3], parts[-1]
        if not ({PY_TAG, "py3", "cp310", "cp311", "cp39"} & set(py.split("."))):
            continue
        if "x86_64" not in platform_tag and platform_tag != "any":
            continue
        found.setdefault(_norm(parts[0]), []).append(parts[1])
    return found


def cmd_prepare(args: argparse.Namespace) -> int:
    ok = True
    status, message = protos_status()
    if status != "fresh":
        if not has_grpc_tools(args.python):
            print(f"protos: {message}; {args.python} has no grpc_tools to regenerate it")
            ok = False
        else:
            regenerate(args.python)
            status, message = protos_status()
    print(f"protos: {status}: {message}")
    want, have = pins(), wheels_present()
    missing = [f"{n}=={want[n]}" for n in CARRIED if want[n] not in have.get(n, [])]
    if missing and args.download:
        WHEELS.mkdir(exist_ok=True)
        platforms = [
            a
            for p in (
                "manylinux_2_28_x86_64",
                "manylinux_2_27_x86_64",
                "manylinux_2_17_x86_64",
                "manylinux2014_x86_64",
                "manylinux1_x86_64",
            )
            for a in ("--platform", p)
        ]
        subprocess.run(
            [
                args.python,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--implementation",
                "cp",
                *platforms,
                "-d",
                str(WHEELS),
                *missing,
            ],
            check=False,
        )
        have = wheels_present()
        missing = [f"{n}=={want[n]}" for n in CARRIED if want[n] not in have.get(n, [])]
    extra = {n: v for n, v in have.items() if len(v) > 1}
    for name in CARRIED:
        print(f"wheel {name}: {', '.join(have.get(name, [])) or 'MISSING'} (pinned {want[name]})")
    if missing:
        print(f"missing wheels: {' '.join(missing)} (run with --download)")
        ok = False
    if extra:
        print(f"several versions of {sorted(extra)} in .whl/: one install would fail; keep one")
        ok = False
    for path in (WHEELS, GENERATED):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
        print(f"size {path.name}/: {size / 2**20:.1f} MiB")
    return 0 if ok else 1


# ---- environment ------------------------------------------------------------------------------------
def cmd_env(args: argparse.Namespace) -> int:
    """What ran: Python, torch/CUDA, the GPU, and which grpc/protobuf (and from where)."""
    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "gateway_dtype_env": os.environ.get("GATEWAY_DTYPE"),  # unset: the gateway's default
    }
    problems: list[str] = []
    want = pins()
    for module, dist in (
        ("grpc", "grpcio"),
        ("google.protobuf", "protobuf"),
        ("grpc_health.v1.health", "grpcio-health-checking"),
        ("grpc_reflection.v1alpha.reflection", "grpcio-reflection"),
        ("numpy", None),
    ):
        try:
            mod = __import__(module, fromlist=["_"])
            version = getattr(mod, "__version__", None)
            if version is None:
                from importlib.metadata import version as dist_version

                version = dist_version(dist) if dist else None
            info[dist or module] = {"version": version, "file": getattr(mod, "__file__", None)}
            if dist in ("grpcio", "protobuf") and version != want.get(dist):
                problems.append(f"{dist} {version} is not the pinned {want.get(dist)}")
        except Exception as exc:  # report, do not stop: the summary says what is missing
            info[dist or module] = {"error": f"{type(exc).__name__}: {exc}"}
            problems.append(f"{dist or module}: {type(exc).__name__}: {exc}")
    try:
        import twotower.v1.retrieval_gateway_pb2_grpc  # noqa: F401  (checks grpc/protobuf versions)

        info["twotower_import"] = "ok"
    except Exception as exc:
        info["twotower_import"] = f"{type(exc).__name__}: {exc}"
        problems.append(f"twotower import: {type(exc).__name__}: {exc}")
    info["protos"] = protos_status()[0]
    try:  # optional: the gateway's fused split-query kernel on cuda (retrieval_gateway/topk_triton.py)
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import torch

        cuda = torch.cuda.is_available()
        info["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "cuda_available": cuda,
            "threads": torch.get_num_threads(),
        }
        if cuda:
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "sms": p.multi_processor_count,
            }
            a = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
            try:  # the index's bf16 GEMM with fp32 output
                out = torch.mm(a, a.T, out_dtype=torch.float32)
                torch.cuda.synchronize()
                info["mm_out_dtype_fp32"] = str(out.dtype)
            except Exception as exc:
                info["mm_out_dtype_fp32"] = f"{type(exc).__name__}: {exc}"
                problems.append(f"torch.mm(out_dtype=float32) on cuda: {exc}")
        elif args.device == "cuda":
            problems.append("torch sees no CUDA device")
    except Exception as exc:
        info["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
        problems.append(f"torch: {exc}")
    info["problems"] = problems
    smi = shutil.which("nvidia-smi") or next(
        (p for p in ("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi") if os.access(p, os.X_OK)),
        None,
    )
    smi_text = "nvidia-smi: not found\n"
    if smi:
        try:
            smi_text = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
            query = subprocess.run(
                [
                    smi,
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
                    "--format=csv",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            smi_text += "\n" + query
            info["nvidia_smi"] = query.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            smi_text = f"nvidia-smi failed: {exc}\n"
    Path(args.json).write_text(json.dumps(info, indent=2))
    Path(args.txt).write_text(json.dumps(info, indent=2) + "\n\n" + smi_text)
    print(json.dumps(info, indent=2))
    return 1 if problems else 0


# ---- summary ----------------------------------------------------------------------------------------
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, rc, seconds, limit, command = (line.split("\t") + [""] * 6)[:6]
            steps.append(
                {
                    "step": name,
                    "status": status,
                    "rc": int(rc or 0),
                    "seconds": float(seconds or 0),
                    "limit_s": int(limit or 0),
                    "command": command,
                }
            )
    return steps


def read_junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    total["failed_names"] = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return total


def index_summary(data: dict, full_scale: bool) -> dict:
    rows = [
        {k: r.get(k) for k in ("method", "batch", "ms_median", "ms_min", "qps", "recall")}
        for r in data.get("rows", [])
    ]
    targets = {}
    for r in rows:
        if r["method"] in ("topk bf16", "index.search bf16") and r["batch"] in INDEX_TARGETS:
            bound = INDEX_TARGETS[r["batch"]]
            key = f"{r['method'].replace(' ', '_')}_b{r['batch']}_ms"
            targets[key] = {
                "value": round(r["ms_median"], 3),
                "bound": f"<= {bound}",
                "met": r["ms_median"] <= bound if full_scale else None,
            }
        if r["method"] == "topk bf16" and r["batch"] == 1 and r["recall"] is not None:
            targets["recall_bf16_vs_fp32"] = {
                "value": round(r["recall"], 5),
                "bound": f">= {RECALL_TARGET}",
                "met": r["recall"] >= RECALL_TARGET,
            }
    return {
        "config": data.get("config", {}),
        "rows": rows,
        "ratios": data.get("ratios", {}),
        "targets": targets,
    }


def e2e_summary(data: dict, full_scale: bool) -> dict:
    levels = [
        {
            "concurrency": lv["concurrency"],
            "qps": lv.get("qps"),
            "p50_ms": lv.get("p50_ms"),
            "p99_ms": lv.get("p99_ms"),
            "errors": lv.get("errors"),
        }
        for lv in data.get("levels", [])
    ]
    targets = dict(data.get("targets", {}))
    c1 = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if c1 and c1["p50_ms"] is not None:
        targets["c1_p50_ms"] = {
            "value": round(c1["p50_ms"], 3),
            "bound": f"<= {E2E_C1_P50_MS}",
            "met": c1["p50_ms"] <= E2E_C1_P50_MS if full_scale else None,
        }
    return {
        "description": data.get("description"),
        "device": data.get("device"),
        "startup_s": data.get("startup_s"),
        "levels": levels,
        "baseline": [
            {k: b.get(k) for k in ("concurrency", "p50_ms", "user_p50_ms", "index_p50_ms", "qps")}
            for b in data.get("baseline", [])
        ],
        "targets": targets,
    }


def _met(t: dict) -> str:
    return {True: "yes", False: "NO", None: "n/a (rehearsal sizes)"}[t.get("met")]


def cmd_summary(args: argparse.Namespace) -> int:
    out, work = Path(args.out), Path(args.work)
    full = not args.quick and args.device == "cuda"
    steps = read_steps(work / "steps.tsv")
    env = _load(work / "env.json") or {}
    index = _load(out / f"index_bench_{args.device}.json")
    e2e = _load(out / f"e2e_synthetic{'' if args.device == 'cpu' else '_' + args.device}.json")
    result = {
        "device": args.device,
        "quick": args.quick,
        "budget_s": args.budget_s,
        "steps": steps,
        "tests": read_junit(work / "pytest.xml"),
        "env": env,
        "index": index_summary(index, full) if index else None,
        "e2e": e2e_summary(e2e, full) if e2e else None,
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))

    lines = [f"# GPU check ({args.device}{', quick rehearsal sizes' if args.quick else ''})", ""]
    torch_info, gpu = env.get("torch", {}), env.get("gpu", {})
    grpc_v, pb_v = env.get("grpcio", {}).get("version"), env.get("protobuf", {}).get("version")
    lines += [
        f"- Python {env.get('python')}, torch {torch_info.get('version')} (CUDA {torch_info.get('cuda')}), "
        f"GPU {gpu.get('name', 'none')} ({gpu.get('memory_gib', '-')} GiB, sm {gpu.get('capability', '-')})",
        f"- grpcio {grpc_v}, protobuf {pb_v}, "
        f"twotower import {env.get('twotower_import')}, protos {env.get('protos')}",
        f"- gateway dtype: {env.get('gateway_dtype_env') or 'the gateway default (GATEWAY_DTYPE unset)'}",
        *[f"- problem: {p}" for p in env.get("problems", [])],
        "",
        "| step | status | seconds | limit s |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']} |" for s in steps]
    tests = result["tests"]
    if tests:
        lines += [
            "",
            f"Tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped",
        ] + [f"- FAILED {n}" for n in tests["failed_names"]]
    if index:
        cfg = index["config"]
        lines += [
            "",
            f"## Index: {cfg.get('n'):,} x {cfg.get('dim')}, k={cfg.get('k')}, {cfg.get('device')} "
            f"({cfg.get('gpu') or cfg.get('machine')})",
            "",
            "| method | B | ms median | ms min | queries/s | recall vs fp32 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in result["index"]["rows"]:
            rec = "-" if r["recall"] is None else f"{r['recall']:.4f}"
            lines.append(
                f"| {r['method']} | {r['batch']} | {r['ms_median']:.3f} | {r['ms_min']:.3f} | "
                f"{r['qps']:.0f} | {rec} |"
            )
    if e2e:
        s = result["e2e"]
        lines += [
            "",
            f"## End to end: {s['description']} (gateway on {s['device']}, start-up {s['startup_s']} s)",
            "",
            "| concurrency | QPS | p50 ms | p99 ms | errors |",
            "|---:|---:|---:|---:|---|",
        ]
        for lv in s["levels"]:
            errors = ", ".join(f"{k} {v}" for k, v in (lv["errors"] or {}).items()) or "0"
            cols = f"{lv['qps']:.1f} | {lv['p50_ms']:.2f} | {lv['p99_ms']:.2f}"
            lines.append(f"| {lv['concurrency']} | {cols} | {errors} |")
    targets = {**(result["index"] or {}).get("targets", {}), **(result["e2e"] or {}).get("targets", {})}
    if targets:
        lines += ["", "## Targets", "", "| target | value | bound | met |", "|---|---:|---|---|"]
        lines += [f"| {k} | {t['value']} | {t['bound']} | {_met(t)} |" for k, t in targets.items()]
    bench_report = work / "report" / "report.md"
    if bench_report.is_file():  # bench/report.py's tables; its plots stay behind (a few files out)
        text = bench_report.read_text().replace("# Benchmark report", "# bench/report.py", 1)
        lines += ["", *[ln for ln in text.splitlines() if not ln.startswith("![")]]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    # The table printed last: a remote run's log tail shows it.
    print("\n==== GPU check summary " + "=" * 60)
    for s in steps:
        print(f"{s['step']:<8} {s['status']:<8} {s['seconds']:6.0f} s  (limit {s['limit_s']} s)")
    if tests:
        failed = tests["failures"] + tests["errors"]
        print(f"tests    {tests['passed']} passed, {failed} failed, {tests['skipped']} skipped")
    for p in env.get("problems", []):
        print(f"problem  {p}")
    if index:
        for r in result["index"]["rows"]:
            rec = "" if r["recall"] is None else f"  recall {r['recall']:.4f}"
            print(f"index    {r['method']:<36} B={r['batch']:<3} {r['ms_median']:9.3f} ms{rec}")
    if e2e:
        for lv in result["e2e"]["levels"]:
            print(
                f"e2e      c={lv['concurrency']:<4} {lv['qps']:9.1f} QPS  p50 {lv['p50_ms']:7.2f} ms  "
                f"p99 {lv['p99_ms']:7.2f} ms  errors {sum((lv['errors'] or {}).values())}"
            )
    for k, t in targets.items():
        print(f"target   {k}: {t['value']} (want {t['bound']}) {_met(t)}")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'report.md'}")
    return 0 if all(s["status"] == "ok" for s in steps) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="regenerate twotower/ if stale, check (and --download) .whl/")
    prep.add_argument("--download", action="store_true", help="pip download the missing pinned wheels")
    protos = sub.add_parser("protos", help="is twotower/ generated from the current protos?")
    protos.add_argument("--regenerate", action="store_true", help="regenerate when grpc_tools is present")
    env = sub.add_parser("env", help="versions, GPU and nvidia-smi")
    env.add_argument("--device", default="cuda")
    env.add_argument("--txt", required=True)
    env.add_argument("--json", required=True)
    summary = sub.add_parser("summary", help="gpu_check.json, report.md and the closing table")
    summary.add_argument("--out", required=True)
    summary.add_argument("--work", required=True)
    summary.add_argument("--device", default="cuda")
    summary.add_argument("--quick", action="store_true")
    summary.add_argument("--budget-s", type=int, default=0)
    for s in (prep, protos):
        s.add_argument("--python", default=sys.executable, help="the interpreter that runs grpc_tools")
    args = p.parse_args(argv)
    return {"prepare": cmd_prepare, "protos": cmd_protos, "env": cmd_env, "summary": cmd_summary}[
        args.command
    ](args)


if __name__ == "__main__":
    sys.exit(main())
