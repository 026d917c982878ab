"""The suite's figures as markdown tables (for docs/performance.md) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The targets of issue 7 on the CPU machine.
SATURATION_TARGET = 0.90
LATENCY_BUDGET_MS = 1.0


def _errors(row: dict[str, Any]) -> str:
    total = sum(row["codes"].values()) or 1
    failed = {k: v for k, v in row["codes"].items() if k != "OK"}
    if not failed:
        return "0"
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(failed.items()))


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _cpu_budget(sat: dict[str, Any]) -> list[str]:
    """Where one served request's CPU went at a saturation point, against raw's cost per item: the
    share the model got bounds the ratio on a machine where the server and client share the cores."""
    cpu = sat.get("cpu_ms_per_request")
    if not cpu:
        return []  # a run from before the per-role figures
    items = sat["served_at"]["items_per_request"]
    client = sat["client_cpu_ms_per_request"]
    total = sum(cpu.values()) + client
    # Clamped: /proc counts in 10 ms ticks, so a near-idle role can read a hair below zero.
    rest = max(0.0, total - cpu["event_loop"] - cpu["inference"] - client)
    return [
        f"| (CPU per request of {items} at that point) | event loop {cpu['event_loop']:.2f} ms, "
        f"inference {cpu['inference']:.2f} ms ({cpu['inference'] / items:.2f} per item; raw "
        f"{sat['raw_cpu_ms_per_item']:.2f}), other server threads {rest:.2f} ms, load generator "
        f"{client:.2f} ms: the model got **{cpu['inference'] / total:.0%}** of the CPU spent | |"
    ]


def model_tables(name: str, m: dict[str, Any]) -> list[str]:
    lines = [f"### {name} (v{m['version']}, {m['task']})", ""]
    sat = m["saturation"]
    lat = m["latency_c1"]
    rounds = len(sat["rounds"])
    if "threads" in m:
        lines += [
            f"{m['threads']['instances']} instance(s) x {m['threads']['intra_op']} onnxruntime thread(s) "
            "per run, on both sides.",
            "",
        ]
    lines += [
        f"Medians of {rounds} alternating raw/served rounds (both sides under the same machine load).",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| served at saturation >= {SATURATION_TARGET:.2f} x raw at its best batch | "
        f"served {sat['served_items_per_s']:.0f} items/s (c={sat['served_at']['concurrency']}, "
        f"{sat['served_at']['items_per_request']} per request) vs raw {sat['raw_items_per_s']:.0f} items/s "
        f"(batch {sat['raw_best_batch']}) = **{sat['ratio']:.3f} x** | "
        f"{_met(sat['ratio'] >= SATURATION_TARGET)} |",
    ]
    lines += _cpu_budget(sat)
    one = m["saturation_single_item"]
    lines += [
        f"| the same, one item per request (the server does all the batching) | "
        f"served {one['served_items_per_s']:.0f} items/s (c={one['served_at']['concurrency']}) vs raw "
        f"{one['raw_items_per_s']:.0f} items/s = **{one['ratio']:.3f} x** | "
        f"{_met(one['ratio'] >= SATURATION_TARGET)} |",
    ]
    lines += _cpu_budget(one)
    shm = m.get("saturation_shared_memory")
    if shm:
        lines.append(
            f"| the same as the first, inputs in system shared memory (a client on the same host) | "
            f"served {shm['served_items_per_s']:.0f} items/s vs raw {shm['raw_items_per_s']:.0f} items/s "
            f"= **{shm['ratio']:.3f} x** | {_met(shm['ratio'] >= SATURATION_TARGET)} |"
        )
        lines += _cpu_budget(shm)
    lines += [
        f"| concurrency 1 median <= raw batch 1 + {LATENCY_BUDGET_MS:.0f} ms | "
        f"served p50 {lat['served_p50_ms']:.2f} ms vs raw p50 {lat['raw_p50_ms']:.2f} ms "
        f"= **+{lat['added_ms']:.2f} ms** | "
        f"{_met(lat['added_ms'] <= LATENCY_BUDGET_MS)} |",
    ]
    lines.append(
        f"| (the same against raw batch 1 with the session idle {lat['idle_gap_ms']:g} ms between runs) | "
        f"raw p50 {lat['raw_idle_gaps_p50_ms']:.2f} ms = **+{lat['added_vs_idle_gaps_ms']:.2f} ms** | "
        f"{_met(lat['added_vs_idle_gaps_ms'] <= LATENCY_BUDGET_MS)} |"
    )
    stages = lat.get("server_stages")
    if stages:
        lines.append(
            f"| (where the c=1 time goes) | gRPC empty call p50 {lat['empty_rpc_p50_ms']:.2f} ms; inside the "
            f"server (means): total {stages['success_ms']:.2f} ms = queue {stages['queue_ms']:.2f} + input "
            f"{stages['compute_input_ms']:.2f} + onnxruntime {stages['compute_infer_ms']:.2f} + output "
            f"{stages['compute_output_ms']:.2f} ms | |"
        )
    for kind, sides in m.get("batching", {}).items():
        on, off = sides["on"], sides["off"]
        ahead = on["items_per_s"] > off["items_per_s"] and on["p99_ms"] < off["p99_ms"]
        lines.append(
            f"| batching on vs off, c=32, {kind}: batching ahead | on {on['items_per_s']:.0f} items/s, "
            f"p99 {on['p99_ms']:.1f} ms; off {off['items_per_s']:.0f} items/s, p99 {off['p99_ms']:.1f} ms "
            f"= **{on['items_per_s'] / off['items_per_s']:.2f} x** throughput | {_met(ahead)} |"
        )
    spread = m.get("raw_one_run_all_cores")
    if spread:
        cells = ", ".join(
            f"batch {r['batch']}: {r['items_per_s']:.0f} items/s, p50 {r['p50_ms']:.2f} ms" for r in spread
        )
        lines.append(f"| (reference: raw, one run at a time over every core) | {cells} | |")
    pre = m["preprocessing"]
    lines += [
        f"| preprocessing keeps up with the model | {pre['what']}: {pre['items_per_s']:.0f} {pre['unit']} "
        f"= **{pre['vs_model_raw_best']:.2f} x** the model's raw best | "
        f"{_met(pre['vs_model_raw_best'] >= 1)} (per core) |",
        "",
        "Raw onnxruntime against the server with the same number of items per request "
        "(served: KServe tensors, "
        f"{m['items_per_request'][0]['concurrency'] if m['items_per_request'] else '?'} requests in flight):",
        "",
        "| batch | raw items/s | raw p50 ms | raw cpu-ms/item | served items/s | served p50 ms "
        "| served p99 ms | server cpu-ms/item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    served_by_batch = {r["items_per_request"]: r for r in m["items_per_request"]}
    for raw in m["raw"]:
        s = served_by_batch.get(raw["batch"])
        served = (
            f"{s['items_per_s']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {s['server_cpu_ms_per_item']:.2f}"
            if s
            else "- | - | - | -"
        )
        raw_cells = f"{raw['items_per_s']:.0f} | {raw['p50_ms']:.2f} | {raw['cpu_ms_per_item']:.2f}"
        lines.append(f"| {raw['batch']} | {raw_cells} | {served} |")
    lines += ["", "Against concurrency (one item per request, KServe):", ""]
    kinds = list(m["concurrency"])
    header = "| concurrency | " + " | ".join(
        f"{k} items/s | {k} p50 ms | {k} p99 ms | {k} errors" for k in kinds
    )
    lines += [header + " |", "|---" * (1 + 4 * len(kinds)) + "|"]
    for i, c_row in enumerate(m["concurrency"][kinds[0]]):
        cells = []
        for kind in kinds:
            r = m["concurrency"][kind][i]
            cells.append(f"{r['items_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {_errors(r)}")
        lines.append(f"| {c_row['concurrency']} | " + " | ".join(cells) + " |")
    if m.get("fineserve_v1"):
        lines += ["", "fineserve.v1 API at concurrency 32, one item per request:", ""]
        for kind, r in m["fineserve_v1"].items():
            lines.append(
                f"- {kind}: {r['items_per_s']:.0f} items/s, "
                f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
            )
    lines.append("")
    return lines


def write_tables(results: dict[str, Any], path: Path) -> str:
    """Writes the markdown tables to ``path`` and returns them."""
    server = results["server"]
    threads = results["threads"]
    if threads.get("instances", 1):
        runs = (
            f"{threads['instances']} instance(s) = raw runs side by side, "
            f"onnxruntime intra-op threads {threads['intra_op']} per run"
        )
    else:
        runs = "instances and threads per model as the server measured them at load (below), raw the same"
    lines = [
        f"`{results['command']}` on {results['machine']['cpus']} CPUs ({results['machine']['host']}), "
        f"{results['seconds_per_point']:g} s per point, {runs}, inter-op {threads['inter_op']}, "
        f"spinning {'during runs' if threads.get('spinning') else 'off'} (both sides).",
        "",
        "| server | figure |",
        "|---|---|",
        f"| process start to health SERVING | {server['seconds_to_serving']:.2f} s |",
        f"| resident memory, idle (all models loaded) | {server['idle_rss_mb']:.0f} MB |",
        f"| resident memory, peak under load | {server['peak_rss_under_load_mb']:.0f} MB |",
        "",
    ]
    for name, m in results["models"].items():
        lines += model_tables(name, m)
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per model and axis: throughput and p99 against concurrency, and against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, m in results["models"].items():
        raw_best = max(r["items_per_s"] for r in m["raw"])
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
        for kind, rows in m["concurrency"].items():
            xs = [r["concurrency"] for r in rows]
            top.plot(xs, [r["items_per_s"] for r in rows], marker="o", label=f"served, {kind}")
            bottom.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=f"served, {kind}")
        top.axhline(raw_best, color="grey", linestyle="--", label="raw onnxruntime, best batch")
        top.set_ylabel("items/s")
        bottom.set_ylabel("p99 latency (ms)")
        bottom.set_xlabel("requests in flight (1 item each)")
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(xs, [str(x) for x in xs])
        bottom.set_yscale("log")
        top.legend(fontsize=8)
        top.set_title(f"{name}: throughput and p99 against concurrency")
        written.append(_save(fig, out_dir / f"suite-{name}-concurrency.png"))

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
        raw_xs = [r["batch"] for r in m["raw"]]
        served = m["items_per_request"]
        top.plot(raw_xs, [r["items_per_s"] for r in m["raw"]], marker="o", label="raw onnxruntime")
        top.plot(
            [r["items_per_request"] for r in served],
            [r["items_per_s"] for r in served],
            marker="o",
            label="served (items per request)",
        )
        bottom.plot(raw_xs, [r["p99_ms"] for r in m["raw"]], marker="o", label="raw onnxruntime")
        bottom.plot(
            [r["items_per_request"] for r in served],
            [r["p99_ms"] for r in served],
            marker="o",
            label="served",
        )
        top.set_ylabel("items/s")
        bottom.set_ylabel("p99 latency (ms)")
        bottom.set_xlabel("batch size (items per request)")
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(raw_xs, [str(x) for x in raw_xs])
        top.legend(fontsize=8)
        top.set_title(f"{name}: throughput and p99 against batch size")
        written.append(_save(fig, out_dir / f"suite-{name}-batch.png"))
        plt.close("all")
    return written


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
