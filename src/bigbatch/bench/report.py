"""A benchmark's result as a markdown table, the targets it is held to, and a figure."""

from __future__ import annotations

import math
from pathlib import Path

from bigbatch.bench.setups import ACCUM, PEER, PLAIN_MICRO

MiB = 2**20


def mib(value) -> str:
    return "-" if value is None else f"{value / MiB:,.1f}"


def fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    b, k = cfg["batch_size"], cfg["accum_freq"]
    lines = [f"### bigbatch benchmark: {cfg['model']} on {env['device_name']}",
             "",
             f"{cfg['precision']}, micro-batch b={b}, K={k} (global batch {b * k}); "
             f"{cfg['steps']} timed rounds after {cfg['warmup_steps']} warm-up, interleaved; "
             f"{env['date']}; torch {env['versions']['torch']}, open_clip {env['versions']['open_clip_torch']}; "
             f"load average {env['load_average_start']} -> {env['load_average_end']}",
             ""]
    cuda = env["device"].startswith("cuda")
    if cuda:
        mem_cols = ["peak memory (MiB)", "peak before optimizer step (MiB)", "saved for backward (MiB)"]
        mem_keys = ["cuda_peak_bytes", "cuda_peak_before_optimizer_step_bytes", "saved_peak_bytes"]
    else:
        mem_cols = ["saved for backward (MiB)", "step tensors, fwd+bwd peak (MiB)", "step tensors, peak (MiB)"]
        mem_keys = ["saved_peak_bytes", "live_peak_before_optimizer_step_bytes", "live_peak_bytes"]
    lines += ["| configuration | batch | samples/s (median) | vs plain (paired median [q1, q3]) | "
              "vs plain per micro-batch | " + " | ".join(mem_cols) + " |",
              "|---|---|---:|---:|---:|" + "---:|" * len(mem_cols)]
    for name, row in result["configs"].items():
        if "error" in row:
            lines.append(f"| {name} | {row.get('batch', '')} | not run: {row['error']} | | |"
                         + " |" * len(mem_cols))
            continue
        mem = row.get("memory", {})
        ratios = [_with_quartiles(row, key) for key in ("ratio_to_plain", "ratio_to_plain_micro")]
        lines.append(f"| {name} | {row['batch']} | {row['median_samples_per_s']:.1f} | {' | '.join(ratios)} | "
                     + " | ".join(mib(mem.get(k)) for k in mem_keys) + " |")
    accum = result["configs"].get(ACCUM, {})
    if "speedup_vs_peer" in accum:
        q = accum["speedup_vs_peer_q1_q3"]
        lines += ["", f"bigbatch accumulated / open_clip_train accumulated, samples/s (paired median): "
                      f"{accum['speedup_vs_peer']:.2f} [q1 {q[0]:.2f}, q3 {q[1]:.2f}]"]
    lines += ["", "Memory: " + result.get("memory_method", "")]
    targets = result.get("targets", {})
    if targets:
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        for name, t in targets.items():
            met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {name} | {t['measured']} | {met} |")
    loss = result.get("loss_working_set")
    if loss and loss.get("rows"):
        variants = ["plain", "tiled"]
        head = "| N |"
        for v in variants:
            name = v if v == "plain" else f"tiled, tile {loss['tile']}"
            head += f" {name}: measured (MiB) | {name}: analytic (MiB) |"
        lines += ["", f"Contrastive loss working set, one forward + backward, D={loss['rows'][0]['D']} "
                  f"({loss['metric']}):", "", head, "|---:|" + "---:|---:|" * len(variants)]
        for row in loss["rows"]:
            cells = [f"{row['N']:,}"]
            for v in variants:
                e = row[v]
                measured = mib(e.get("measured_bytes"))
                if "measure_error" in e:
                    measured = f"failed: {e['measure_error']}"
                cells += [measured, f"{mib(e['analytic_bytes'])} (analytic)"]
            lines.append("| " + " | ".join(cells) + " |")
    search = result.get("largest_batch")
    if search:
        lines += ["", "Largest global batch completing one step (doubling from b):", "",
                  "| configuration | largest global batch | stopped because |", "|---|---:|---|"]
        for name, s in search.items():
            lines.append(f"| {name} | {s['largest_global_batch'] or '-'} | {s['stopped']} |")
    phases = result.get("phases")
    if phases:
        lines += ["", "Where the time goes (medians of separately timed pieces, seconds; `--profile`):", "",
                  "| forward no-grad, b | fwd+bwd, b | K x fwd+bwd, b, accumulating | fwd+bwd, K*b | "
                  "AdamW step: fused, ours | default, the peer's | "
                  "predicted vs plain: bigbatch | open_clip_train | without any recompute | "
                  "bigbatch vs plain per micro-batch |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {phases['forward_nograd_micro_s']:.4f} | {phases['forward_backward_micro_s']:.4f} | "
                  f"{phases['forward_backward_K_micro_accumulated_s']:.4f} | {phases['forward_backward_global_s']:.4f} | "
                  f"{phases['optimizer_step_s']:.4f} | {phases['optimizer_step_peer_s']:.4f} | "
                  f"{phases['predicted_ratio_accum']:.2f} | "
                  f"{phases['predicted_ratio_peer']:.2f} | {phases['predicted_ratio_accum_without_recompute']:.2f} | "
                  f"{fmt(phases.get('predicted_ratio_accum_vs_plain_micro'))} |"]
    profiled = result.get("profile")
    if profiled:
        lines += ["", "One profiled step each (`--profile`, which itself lengthens the step): the device's "
                  "time is its kernels', copies' and memsets' summed over streams, its share of the step's "
                  "wall time below 1 where the device waited for the host; host syncs stall the launch "
                  "queue, asynchronous copies do not:", "",
                  "| configuration | step s | device s | device / wall | host syncs | async copies |",
                  "|---|---:|---:|---:|---|---:|"]
        for name, p in profiled.items():
            syncs = ", ".join(f"{k} x{v}" for k, v in p["host_syncs"].items()) or "none"
            lines.append(f"| {name} | {p['wall_s']:.4f} | {fmt(p['device_time_s'])} | "
                         f"{fmt(p['device_time_share'])} | {syncs} | {p['host_async_copies']} |")
    return "\n".join(lines) + "\n"


def _with_quartiles(row: dict, key: str) -> str:
    q = row.get(f"{key}_q1_q3") or []
    return fmt(row.get(key)) + (f" [{q[0]:.2f}, {q[1]:.2f}]" if len(q) == 2 else "")


RATIO_TARGET_K = 4  # accumulated/plain >= 0.78 is set at K = 4


def targets(configs: dict, accum_freq: int) -> dict:
    """The issue's targets. accumulated/plain is read against both plains: the global batch
    in one pass (more memory, bigger kernels) and the same micro-batch without accumulation
    (the same memory class: the K - 1 no-grad forwards alone; 3K / (4K - 1) if a forward is a
    third of forward + backward: 0.80 at K = 4, 0.76 at K = 16). So 0.78 is judged at K = 4
    only; at another K the ratio is shown, not judged."""
    accum, peer = configs.get(ACCUM, {}), configs.get(PEER, {})
    speedup = accum.get("speedup_vs_peer")
    judged = accum_freq == RATIO_TARGET_K
    out = {}
    for key, label in (("ratio_to_plain", "plain"), ("ratio_to_plain_micro", "plain per micro-batch")):
        if key == "ratio_to_plain" or PLAIN_MICRO in configs:
            ratio = accum.get(key)
            name = f"bigbatch accumulated / {label} >= 0.78" + ("" if judged else f" (set at K = {RATIO_TARGET_K})")
            out[name] = {"measured": fmt(ratio), "met": None if ratio is None or not judged else ratio >= 0.78}
    out["bigbatch accumulated >= 1.15x open_clip_train accumulated (samples/s)"] = {
        "measured": fmt(speedup), "met": None if speedup is None else speedup >= 1.15}
    keys = (["cuda_peak_bytes", "saved_peak_bytes"] if "cuda_peak_bytes" in accum.get("memory", {})
            else ["saved_peak_bytes", "live_peak_bytes"])
    for key in keys:
        mine, theirs = accum.get("memory", {}).get(key), peer.get("memory", {}).get(key)
        out[f"bigbatch peak memory <= open_clip_train's ({key})"] = {
            "measured": f"{mib(mine)} vs {mib(theirs)} MiB"
                        + (f" ({mine - theirs:+,} bytes)" if mine is not None and theirs is not None else ""),
            "met": None if mine is None or theirs is None else mine <= theirs}
    return out


def plot(result: dict, out_png: Path) -> Path:
    """Throughput ratio to plain, peak memory, and the loss working set, side by side."""
    from matplotlib.figure import Figure
    configs = {n: r for n, r in result["configs"].items() if "error" not in r}
    cuda = result["environment"]["device"].startswith("cuda")
    loss_rows = (result.get("loss_working_set") or {}).get("rows") or []
    fig = Figure(figsize=(15 if loss_rows else 10, 4.5), layout="constrained")
    axes = fig.subplots(1, 3 if loss_rows else 2)
    names = list(configs)
    labels = [n.replace(" accumulated", "\naccumulated").replace(" plain", "\nplain").replace(" per", "\nper")
              for n in names]
    palette = {PLAIN_MICRO: "tab:olive", ACCUM: "tab:blue", PEER: "tab:orange"}
    colors = [palette.get(n, "tab:gray") for n in names]

    bases = [("ratio_to_plain", "vs plain")] + ([("ratio_to_plain_micro", "vs plain per micro-batch")]
                                                if PLAIN_MICRO in configs else [])
    width = 0.8 / len(bases)
    for i, (key, legend) in enumerate(bases):
        ratios = [configs[n].get(key, math.nan) for n in names]
        xs = [j + (i - (len(bases) - 1) / 2) * width for j in range(len(names))]
        bars = axes[0].bar(xs, ratios, width, color=colors, alpha=1.0 - 0.4 * i, hatch="//" if i else None,
                           label=legend)
        axes[0].bar_label(bars, labels=[f"{r:.2f}" for r in ratios], fontsize=7)
    axes[0].set_xticks(range(len(names)), labels)
    axes[0].axhline(0.78, color="tab:green", ls="--", lw=1, label="target 0.78 (at K = 4)")
    axes[0].set_ylabel("samples/s relative to a plain step (paired median)")
    axes[0].set_title("throughput")
    axes[0].legend(fontsize="small")

    mem_keys = ({"max_memory_allocated": "cuda_peak_bytes", "saved for backward": "saved_peak_bytes"} if cuda
                else {"saved for backward": "saved_peak_bytes",
                      "step tensors (fwd+bwd)": "live_peak_before_optimizer_step_bytes",
                      "step tensors (whole step)": "live_peak_bytes"})
    width = 0.8 / len(mem_keys)
    for i, (legend, key) in enumerate(mem_keys.items()):
        mems = [configs[n].get("memory", {}).get(key, math.nan) / MiB for n in names]
        xs = [j + (i - (len(mem_keys) - 1) / 2) * width for j in range(len(names))]
        bars = axes[1].bar(xs, mems, width, label=legend, alpha=1.0 - 0.25 * i, color=colors)
        axes[1].bar_label(bars, labels=[f"{m:.1f}" for m in mems], fontsize=7)
    axes[1].set_xticks(range(len(names)), labels)
    axes[1].set_ylabel("MiB")
    axes[1].set_title("peak memory, bars: " + " | ".join(mem_keys), fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)

    if loss_rows:
        ax = axes[2]
        for variant, color, marker in (("plain", "tab:red", "o"), ("tiled", "tab:blue", "x")):
            points = [(r["N"], r[variant]) for r in loss_rows if variant in r]
            measured = [(n, e["measured_bytes"] / MiB) for n, e in points if "measured_bytes" in e]
            analytic = [(n, e["analytic_bytes"] / MiB) for n, e in points]
            ax.plot(*zip(*analytic), "--", color=color, alpha=0.6, label=f"{variant} (analytic)")
            if measured:
                ax.plot(*zip(*measured), marker=marker, markersize=8, color=color, label=f"{variant} (measured)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch N")
        ax.set_ylabel("MiB")
        ax.set_title(f"contrastive loss working set (D={loss_rows[0]['D']})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")

    cfg = result["config"]
    fig.suptitle(f"{cfg['model']}, b={cfg['batch_size']} x K={cfg['accum_freq']}, {cfg['precision']} on "
                 f"{result['environment']['device_name']}", fontsize=10)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png

