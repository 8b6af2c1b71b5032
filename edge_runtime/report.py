"""report.md and its plot for a personalisation run: the finalists, their measurements and the choice."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from edge_runtime.atomic import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from edge_runtime.personalize import Finalist


def write_report(out_dir: Path, subnet: Dict[str, Any], finalists: Sequence["Finalist"], chosen: "Finalist") -> None:
    """Write the plot and report.md into `out_dir`, each atomically."""
    files = subnet["files"]
    write_score_latency_plot(out_dir / files["plot"], finalists, chosen, subnet["constraints"].get("max_latency_ms"))
    write_text_atomic(out_dir / files["report"], render_report(subnet, finalists, chosen))


def write_score_latency_plot(
    path: Path, finalists: Sequence["Finalist"], chosen: "Finalist", max_latency_ms: Optional[float] = None
) -> None:
    """Plot score against p50 latency for the finalists, the chosen one marked, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The Figure API with the Agg canvas leaves pyplot's global state and backend alone.
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    scores = [_plot_score(f) for f in finalists]
    for finalist, score in zip(finalists, scores):
        if finalist.latency is None:
            continue
        style = {"color": "tab:blue"} if finalist.meets_limits else {"facecolors": "none", "edgecolors": "tab:gray"}
        axes.scatter([finalist.latency.p50_ms], [score], s=36, **style)
    if chosen.latency is not None:
        axes.scatter([chosen.latency.p50_ms], [_plot_score(chosen)], marker="*", s=260, color="tab:red",
                     label="chosen", zorder=3)
    if max_latency_ms is not None:
        axes.axvline(max_latency_ms, color="tab:gray", linestyle="--", linewidth=1, label="latency limit")
    uses_forward = any(not math.isfinite(f.score) for f in finalists)
    axes.set_xlabel("latency p50 (ms, batch 1, onnxruntime)")
    axes.set_ylabel("forward score" if uses_forward else "aggregated score")
    axes.set_title(f"{len(finalists)} finalists: score against measured latency")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(str(temporary), format="png")


def _plot_score(finalist: "Finalist") -> float:
    return finalist.score if math.isfinite(finalist.score) else finalist.forward_score


def render_report(subnet: Dict[str, Any], finalists: Sequence["Finalist"], chosen: "Finalist") -> str:
    """Render report.md: the choice, the constraints, the finalists with the plot, and the time per stage."""
    lines = _chosen_lines(subnet, finalists, chosen)
    lines += _constraint_lines(subnet["constraints"])
    lines += _finalist_lines(subnet, finalists, chosen)
    lines += _stage_lines(subnet)
    return "\n".join(lines)


def _chosen_lines(subnet: Dict[str, Any], finalists: Sequence["Finalist"], chosen: "Finalist") -> List[str]:
    latency = subnet["measurements"]["latency"]
    power = subnet["measurements"]["power"]
    preprocessing = subnet["preprocessing"]
    return [
        "# edge-nas personalisation report",
        "",
        f"Chosen architecture ({subnet['space']['name']}): `{chosen.arch}`",
        "",
        f"- parameters: {chosen.params:,}; FLOPs (multiply-adds): {chosen.flops:,}",
        f"- aggregated score: {_number(subnet['score'])} ({subnet['aggregation']['final']}, "
        f"over the {len(finalists)} finalists); forward score: {_number(subnet['forward_score'])}",
        f"- latency: p50 {latency['p50_ms']:.3f} ms, p90 {latency['p90_ms']:.3f} ms, mean {latency['mean_ms']:.3f} ms "
        f"({latency['runs']} runs after {latency['warmup_runs']} warm-up runs, {latency['intra_op_threads']} threads, "
        f"{latency['execution_provider']}, onnxruntime {latency['onnxruntime_version']})",
        f"- power: {_power_line(power, subnet['measurements']['energy_per_inference_mj'])}",
        f"- gradient proxies computed: {subnet['gradient_source']}",
        f"- aggregator: {describe_aggregator(subnet['aggregation'])}",
        f"- data: {subnet['data']['source']} ({subnet['data']['images']} images, hash {subnet['data_hash']})",
        "",
        "`model.onnx` holds the untrained network with its seeded initial weights: the search is",
        "training-free, so train or fine-tune the model on your data before using its predictions.",
        f"Its input is float32 {preprocessing['input_shape']} (NCHW, RGB): resize to "
        f"{preprocessing['size'][0]}x{preprocessing['size'][1]}, then compute (pixel / 255 - mean) / std with",
        f"mean {_triple(preprocessing['mean'])} and std {_triple(preprocessing['std'])}.",
        "",
    ]


def describe_aggregator(aggregation: Dict[str, Any]) -> str:
    """Describe in words which aggregator weighted the proxies: label-free, a file, or one received from the cloud."""
    source = aggregation.get("aggregator_source")
    if source == "cloud":
        received = aggregation.get("aggregator_received") or {}
        return (f"received from the cloud (version {received.get('version')}, from {received.get('sender')}), "
                f"stored at {aggregation['aggregator']}")
    if source == "file":
        return f"calibrated, from {aggregation['aggregator']}"
    return "label-free (no calibrated aggregator)"


def _constraint_lines(constraints: Dict[str, Any]) -> List[str]:
    lines = ["## Constraints", ""]
    for key, label in (
        ("max_params", "parameters"),
        ("max_flops", "FLOPs"),
        ("max_latency_ms", "latency p50 (ms)"),
        ("max_power_w", "mean power (W)"),
        ("max_energy_mj", "energy per inference (mJ)"),
    ):
        value = constraints.get(key)
        lines.append(f"- {label}: {'no limit' if value is None else f'at most {value:,}'}")
    lines.append("")
    return lines


def _finalist_lines(subnet: Dict[str, Any], finalists: Sequence["Finalist"], chosen: "Finalist") -> List[str]:
    lines = [
        "## Finalists",
        "",
        "![score against latency](" + subnet["files"]["plot"] + ")",
        "",
        "| # | architecture | params | FLOPs | forward score | score | p50 ms | p90 ms | power W | energy mJ | limits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, finalist in enumerate(finalists, start=1):
        marker = " (chosen)" if finalist is chosen else ""
        latency = finalist.latency
        power = finalist.power
        limits = "met" if finalist.meets_limits else "over: " + ", ".join(finalist.limit_failures)
        lines.append(
            f"| {number}{marker} | `{_table_cell(finalist.arch)}` | {finalist.params:,} | {finalist.flops:,} | "
            f"{_number(finalist.forward_score)} | {_number(finalist.score)} | "
            f"{_number(latency.p50_ms if latency else None)} | {_number(latency.p90_ms if latency else None)} | "
            f"{_number(power.total_w if power else None)} | {_number(power.energy_per_inference_mj if power else None)} | "
            f"{limits} |"
        )
    lines.append("")
    return lines


def _stage_lines(subnet: Dict[str, Any]) -> List[str]:
    lines = ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in subnet["stage_seconds"].items():
        lines.append(f"| {stage} | {seconds:.2f} |")
    peak = subnet.get("peak_memory_mb")
    if peak is not None:
        lines += ["", f"Peak resident memory: {peak:.0f} MB."]
    search = subnet["search"]
    lines += [
        "",
        f"Search: {search['strategy']}, {search['candidates_scored']} candidates scored (budget {search['budget']}), "
        f"probe batch {search['batch_size']}, seed {subnet['seeds']['search']}, edge-nas {subnet['code_version']}.",
        "",
    ]
    return lines


def _power_line(power: Dict[str, Any], energy: Optional[float]) -> str:
    if not power.get("available"):
        return f"not measured: {power.get('reason', 'no power meter on this machine')}"
    rails = ", ".join(f"{name} {watts:.3f} W" for name, watts in power["mean_w_per_rail"].items())
    return (
        f"{power['total_w']:.3f} W mean total ({power['total_from']}, from {power['source']}, "
        f"{power['samples']} readings); energy per inference {_number(energy)} mJ; rails: {rails}"
    )


def _table_cell(text: str) -> str:
    # A pipe splits a Markdown table cell even inside a code span unless it is escaped.
    return text.replace("|", "\\|")


def _number(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def _triple(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
