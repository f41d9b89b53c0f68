"""Figures of the HTTP scenarios (6-9) and of scenario 13, drawn with matplotlib (Agg).

``benchmarks/run.py --plots`` calls :func:`write_plots` after its run, and
``benchmarks/run.py --plots-from results.json`` redraws them from an earlier run. Each
figure names the machine, the versions and the date of the run it shows. A figure
whose scenario did not run is not written (the older file, if any, stays).

* ``step_time_vs_agents.png``: one step against the number of agents, per latency;
* ``speedup_vs_latency.png``: speed-up over sequential Mesa against the latency;
* ``ours_vs_bare.png``: each HTTP step against the bare baseline of the same calls;
* ``rate_limit_429s.png``: HTTP 429 answers and step time, with and without the limit;
* ``reference_comparison.png``: ours against mesa-llm 0.3.2, same server, same run;
* ``scale_vs_agents.png``: scenario 13, one step of 100 ... 100,000 agents awaiting
  0.5 s, ours against a bare ``asyncio.gather``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: files only, no display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

__all__ = ["write_plots"]

Rows = dict[str, dict[str, Any]]

COLORS = {
    "asyncio": "#1f77b4",
    "threading": "#d62728",
    "sequential": "#7f7f7f",
    "reference": "#9467bd",
}
LATENCY_LABEL = {0.0: "0 ms", 0.05: "50 ms", 0.5: "500 ms"}


def _caption(env: dict[str, Any], config: dict[str, Any]) -> str:
    date = str(env.get("date", "?")).replace("T", " ").replace("+00:00", " UTC")
    return (
        f"run of {date} on {env.get('cpu', '?')}, {env.get('nproc', '?')} cores, "
        f"{env.get('platform', '?')}\n{env.get('python', '?')}, Mesa {env.get('mesa', '?')}, "
        f"openai {env.get('openai', '?')}, mesa_llm_parallel {env.get('mesa_llm_parallel', '?')} "
        f"(git {env.get('git_revision', '?')})\n{config.get('command', 'benchmarks/run.py')}"
    )


def _finish(fig: Figure, title: str, caption: str, path: Path, *, bottom: float = 0.5) -> Path:
    """Title, caption (``bottom`` inches kept free for it), save, close."""
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="#555555")
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _seconds_formatter() -> FuncFormatter:
    def fmt(value: float, _pos: int) -> str:
        if value >= 1:
            return f"{value:g} s"
        return f"{value * 1e3:g} ms"

    return FuncFormatter(fmt)


def _cells(rows: Rows) -> dict[tuple[str, int, float], dict[str, Any]]:
    """Matrix cells of scenario 6 keyed by (mode, n, latency)."""
    return {
        (d["mode"], d["n"], d["latency"]): d
        for key, d in rows.items()
        if key.startswith(("http_asyncio_", "http_threading_")) and "ours" in d
    }


def _reference_cells(rows: Rows) -> dict[tuple[str, int, float], dict[str, Any]]:
    return {
        (d["mode"], d["n"], d["latency"]): d
        for key, d in rows.items()
        if key.startswith("reference_") and "theirs" in d and not key.startswith("reference_mesa35")
    }


def _sequential(rows: Rows) -> dict[float, float]:
    return {
        d["latency"]: d["per_agent"]["median"]
        for key, d in rows.items()
        if key.startswith("http_sequential_")
    }


# -- figures -------------------------------------------------------------------------
def plot_step_time(rows: Rows, caption: str, path: Path) -> Path | None:
    cells = _cells(rows)
    if not cells:
        return None
    seq = _sequential(rows)
    ref = _reference_cells(rows)
    ref_version = next((d["mesa"] for d in ref.values()), "3.4")
    latencies = sorted({lat for _, _, lat in cells})
    width = max(10.0, 5.0 * len(latencies))
    fig, axes = plt.subplots(1, len(latencies), figsize=(width, 5.8), squeeze=False)
    for ax, latency in zip(axes[0], latencies, strict=True):
        sizes = sorted({n for _, n, lat in cells if lat == latency})
        if latency in seq:
            span = [min(sizes), max(sizes)]
            ax.plot(
                span,
                [seq[latency] * n for n in span],
                "--",
                color=COLORS["sequential"],
                label="sequential Mesa (extrapolated)",
            )
        for mode in ("asyncio", "threading"):
            points = sorted(
                (n, d) for (m, n, lat), d in cells.items() if m == mode and lat == latency
            )
            if not points:
                continue
            ns = [n for n, _ in points]
            label = "asyncio" if mode == "asyncio" else "threading (64 workers)"
            ax.plot(
                ns,
                [d["ours"]["median"] for _, d in points],
                "o-",
                color=COLORS[mode],
                label=f"ours, {label}",
            )
            bare = "bare gather" if mode == "asyncio" else "bare ThreadPoolExecutor(64).map"
            ax.plot(
                ns,
                [d["bare"]["median"] for _, d in points],
                "s:",
                color=COLORS[mode],
                alpha=0.55,
                markerfacecolor="none",
                label=bare,
            )
            theirs = sorted(
                (n, d) for (m, n, lat), d in ref.items() if m == mode and lat == latency
            )
            if theirs:
                ax.plot(
                    [n for n, _ in theirs],
                    [d["theirs"]["median"] for _, d in theirs],
                    "x--",
                    color=COLORS[mode],
                    markersize=9,
                    markeredgewidth=2,
                    alpha=0.8,
                    label=f"mesa-llm 0.3.2 {mode} (Mesa {ref_version})",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(_seconds_formatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("agents")
        ax.set_title(f"server latency {LATENCY_LABEL.get(latency, latency)}")
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.1)
    axes[0][0].set_ylabel("one model.step() (median)")
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=4,
        fontsize=8,
        bbox_to_anchor=(0.5, 0.09),
        frameon=False,
    )
    return _finish(
        fig,
        "One step of LLM agents over real HTTP (openai clients, loopback server)",
        caption,
        path,
        bottom=1.25,
    )


def plot_speedup(rows: Rows, caption: str, path: Path) -> Path | None:
    cells = _cells(rows)
    seq = _sequential(rows)
    if not cells or not seq:
        return None
    ref = _reference_cells(rows)
    latencies = sorted(seq)
    x = {lat: i for i, lat in enumerate(latencies)}
    fig, ax = plt.subplots(figsize=(10, 5.2))
    styles = {100: "o-", 1000: "s-", 5000: "^-"}
    for mode in ("asyncio", "threading"):
        for n in sorted({n for m, n, _ in cells if m == mode}):
            points = [
                (x[lat], seq[lat] * n / cells[(mode, n, lat)]["ours"]["median"])
                for lat in latencies
                if (mode, n, lat) in cells
            ]
            if len(points) < 2 and n != 5000:
                continue
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                styles.get(n, "o-"),
                color=COLORS[mode],
                alpha=1.0 if n >= 1000 else 0.55,
                label=f"ours, {mode}, {n:,} agents",
            )
        for n in sorted({n for m, n, _ in ref if m == mode}):
            points = [
                (x[lat], seq[lat] * n / ref[(mode, n, lat)]["theirs"]["median"])
                for lat in latencies
                if (mode, n, lat) in ref
            ]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "x--",
                color=COLORS[mode],
                markersize=8,
                markeredgewidth=2,
                alpha=0.7 if n >= 1000 else 0.4,
                label=f"mesa-llm 0.3.2, {mode}, {n:,} agents",
            )
    ax.axhline(1.0, color=COLORS["sequential"], linestyle="--", linewidth=1)
    ax.text(len(latencies) - 1, 1.07, "sequential Mesa", fontsize=7, ha="right", color="#555555")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}x"))
    ax.set_xticks(list(x.values()), [LATENCY_LABEL.get(lat, str(lat)) for lat in latencies])
    ax.set_xlabel("server latency per request")
    ax.set_ylabel("speed-up over sequential Mesa (extrapolated)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _finish(fig, "Speed-up over sequential stepping, by latency", caption, path)


def plot_ours_vs_bare(rows: Rows, caption: str, path: Path) -> Path | None:
    items = [
        (key, d)
        for key, d in rows.items()
        if (key.startswith(("http_asyncio", "http_threading", "http_cap_")))
        and "bare" in d
        and "ratio" in d
    ]
    if not items:
        return None

    def label(d: dict[str, Any]) -> str:
        lat = LATENCY_LABEL.get(d["latency"], f"{d['latency'] * 1e3:g} ms")
        cap = f", cap {d['cap']}" if "cap" in d else ""
        return f"{d['mode']}, {d['n']:,} x {lat}{cap}"

    items.sort(key=lambda kd: ("cap" in kd[1], kd[1]["mode"], kd[1]["latency"], kd[1]["n"]))
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(items) + 2.2))
    ratios = [d["ratio"] for _, d in items]
    colors = [COLORS[d["mode"]] for _, d in items]
    y = range(len(items))
    ax.barh(list(y), ratios, color=colors, alpha=0.8)
    for i, r in zip(y, ratios, strict=True):
        ax.text(r + 0.01, i, f"{r:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(1.3, color="#2ca02c", linestyle="--", linewidth=1.2, label="target 1.3x")
    ax.set_yticks(list(y), [label(d) for _, d in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.45, max(ratios) + 0.15))
    ax.set_xlabel(
        "our step / bare baseline of the same client calls (asyncio: gather on the same loop; "
        "threading: ThreadPoolExecutor.map)",
        fontsize=8,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    return _finish(fig, "Our step against the bare baseline, same run (medians)", caption, path)


def plot_rate_limit(rows: Rows, caption: str, path: Path) -> Path | None:
    items = [d for key, d in rows.items() if key.startswith("ratelimit_")]
    if not items:
        return None
    quota = items[0]["quota"]

    def label(d: dict[str, Any]) -> str:
        if d["limit"]:
            return f"{d['mode']}\nlimit {d['limit']:g}/s"
        return f"{d['mode']}\nno limit\nretries {d['max_retries']}"

    items.sort(key=lambda d: (d["mode"], d["limit"] is not None, d["max_retries"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.4))
    x = list(range(len(items)))
    refused = [max(d["rate_limited_per_step"]) for d in items]
    failed = [max(d["failed_agents_per_step"]) for d in items]
    width = 0.38
    left.bar([i - width / 2 for i in x], refused, width, color="#ff7f0e", label="429 answers")
    left.bar(
        [i + width / 2 for i in x],
        failed,
        width,
        color="#8c564b",
        label="agents left without an answer",
    )
    for i, (r, f) in enumerate(zip(refused, failed, strict=True)):
        left.text(i - width / 2, r, str(r), ha="center", va="bottom", fontsize=8)
        left.text(i + width / 2, f, str(f), ha="center", va="bottom", fontsize=8)
    left.set_xticks(x, [label(d) for d in items], fontsize=7)
    left.set_ylim(0, max([*refused, *failed, 1]) * 1.15)
    left.set_ylabel("per step (worst sample)")
    left.set_title(
        f"{items[0]['n']} agents x {LATENCY_LABEL.get(items[0].get('latency', 0.05), '50 ms')}, "
        f"server quota {quota} requests/s; retries = openai's max_retries",
        fontsize=9,
    )
    left.legend(fontsize=8)
    left.grid(True, axis="y", alpha=0.3)

    ratios = [d["ratio_to_ideal"] for d in items]
    colors = [COLORS[d["mode"]] for d in items]
    right.bar(x, ratios, color=colors, alpha=0.8)
    for i, r in enumerate(ratios):
        right.text(i, r / 2, f"{r:.2f}x", ha="center", va="center", fontsize=9, color="white")
    right.axhline(1.0, color="black", linewidth=1)
    right.axhline(1.15, color="#2ca02c", linestyle="--", linewidth=1.2, label="target 1.15x")
    right.set_xticks(x, [label(d) for d in items], fontsize=7)
    right.set_ylabel(f"step time / ideal (n / quota = {items[0]['ideal']:g} s)")
    right.set_title("step time (median); below 1x = agents dropped", fontsize=10)
    right.legend(fontsize=8)
    right.grid(True, axis="y", alpha=0.3)
    return _finish(
        fig, "A server quota: HTTP 429s with and without the library's rate limit", caption, path
    )


def plot_reference(rows: Rows, caption: str, path: Path) -> Path | None:
    ref = _reference_cells(rows)
    if not ref:
        return None
    keys = sorted(ref, key=lambda k: (k[0], k[2], k[1]))
    version = next(iter(ref.values()))["mesa"]
    ours_version = next(iter(ref.values())).get("ours_mesa", "3.5")
    fig, ax = plt.subplots(figsize=(max(10.0, 1.1 * len(keys) + 2), 5.2))
    x = list(range(len(keys)))
    width = 0.38
    ours = [ref[k]["ours"]["median"] for k in keys]
    theirs = [ref[k]["theirs"]["median"] for k in keys]
    ax.bar(
        [i - width / 2 for i in x],
        ours,
        width,
        color="#2ca02c",
        label=f"ours (Mesa {ours_version})",
    )
    ax.bar(
        [i + width / 2 for i in x],
        theirs,
        width,
        color=COLORS["reference"],
        label=f"mesa-llm 0.3.2 (Mesa {version})",
    )
    for i, k in enumerate(keys):
        ratio = ref[k]["ratio_ours_to_theirs"]
        ax.text(i, max(ours[i], theirs[i]) * 1.12, f"{ratio:.2f}x", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_seconds_formatter())
    labels = [f"{m}\n{n:,} x {LATENCY_LABEL.get(lat, lat)}" for m, n, lat in keys]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("one model.step() (median)")
    ax.set_ylim(top=max(ours + theirs) * 2.5)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title("ratio above each pair = ours / theirs", fontsize=9)
    return _finish(
        fig,
        "Against mesa-llm 0.3.2's parallel stepping: same server, same agents, same run",
        caption,
        path,
    )


def plot_scale(rows: Rows, caption: str, path: Path) -> Path | None:
    """Scenario 13: step time and its overhead above the 0.5 s wait, ours and bare gather."""
    items = sorted(
        (d for key, d in rows.items() if key.startswith("scale_") and "bare_gather" in d),
        key=lambda d: d["n"],
    )
    if len(items) < 2:
        return None
    n = [d["n"] for d in items]
    ours = [d["ours"]["median"] for d in items]
    bare = [d["bare_gather"]["median"] for d in items]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, values, label in (
        (left, (ours, bare), "step time"),
        (right, ([v - 0.5 for v in ours], [v - 0.5 for v in bare]), "time above the 0.5 s wait"),
    ):
        ax.plot(n, values[0], "o-", color=COLORS["asyncio"], label="our asyncio step")
        ax.plot(n, values[1], "s--", color="#ff7f0e", label="bare asyncio.gather")
        ax.set_xlabel("agents, each awaiting asyncio.sleep(0.5)")
        ax.set_ylabel(label)
        ax.yaxis.set_major_formatter(_seconds_formatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("linear axes: the cost grows linearly with the agents", fontsize=9)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_title("log-log: a slope of 1 is linear", fontsize=9)
    return _finish(fig, "One asyncio step, 100 to 100,000 agents (medians)", caption, path)


FIGURES: dict[str, Callable[[Rows, str, Path], Path | None]] = {
    "scale_vs_agents.png": plot_scale,
    "step_time_vs_agents.png": plot_step_time,
    "speedup_vs_latency.png": plot_speedup,
    "ours_vs_bare.png": plot_ours_vs_bare,
    "rate_limit_429s.png": plot_rate_limit,
    "reference_comparison.png": plot_reference,
}


def write_plots(payload: dict[str, Any], folder: Path) -> list[Path]:
    """Draw every figure the run's data allows into ``folder``; return the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: Rows = {row["key"]: row["data"] for row in payload["rows"]}
    caption = _caption(payload.get("environment", {}), payload.get("config", {}))
    written = []
    for name, draw in FIGURES.items():
        path = draw(rows, caption, folder / name)
        if path is not None:
            written.append(path)
    return written
