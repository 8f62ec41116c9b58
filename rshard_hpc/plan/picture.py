"""Who sees what, as a picture (`rshard plan --picture`, `rshard show --picture`): positions across, nodes down
(each CompNode and AttnNode a row, the client left out), each node's view shaded, the gap before each later run
marked with its length (those equal to δ in red), the public prefix marked, δ in the legend and the fraction of
positions each node sees beside its row. The views come from the plan (plan_views) or from what each rank
received (the ledger); δ and the fractions from node_report (architecture.md §4). No MPI; matplotlib is imported
only when a picture is drawn (the `plot` extra) and draws with the Agg backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rshard_hpc.dist.topology import rank_layout
from rshard_hpc.errors import InputError
from rshard_hpc.plan.ledger import ledger_positions
from rshard_hpc.plan.schemes import PlanSpec, make_plan
from rshard_hpc.plan.views import INF, node_report, plan_views, sorted_unique, view_runs

FORMATS = ("png", "svg")
UNSEEN, PUBLIC, GAP, DELTA_GAP, SEEN_COMP, SEEN_ATTN = range(6)  # cell states, in COLORS' order
COLORS = ["#f2f2f2", "#b9b9b9", "#fde9a9", "#f4a3a3", "#3b6fb6", "#e08a2c"]
LABELLED_GAPS_UP_TO = 160  # positions: beyond that the cells are too narrow for gap lengths and outlines


@dataclass
class Row:
    """One node's row: its label, its name ('comp0', 'attn1_2') and the positions it sees."""

    label: str
    node: str
    view: np.ndarray
    report: dict = field(default_factory=dict)


@dataclass
class Picture:
    """What a picture shows: rows in rank order over positions 0 … n−1."""

    title: str
    n: int
    public_prefix: int
    rows: list
    delta: float
    prompt_length: int | None = None  # generate: where the prompt ends and the new tokens begin


# ------------------------------------------------------------------------------------------ what to draw
def plan_picture(spec: PlanSpec, n: int, public_prefix: int = 0) -> Picture:
    """The plan's views of one sequence of n positions."""
    comp, group = make_plan(spec, n)
    views = plan_views(comp, group, spec.alpha, spec.beta)
    title = f"Who sees what: plan {_plan_text(spec.params())}, {n} positions"
    return _picture(title, n, public_prefix, _rows(spec.alpha, spec.beta, views))


def ledger_picture(docs: list, prompt_key: str, plan: dict, public_prefix: int = 0) -> Picture:
    """What each rank received for one prompt (its ledger entries, `prompt_key` as id_key spells the id) under
    `plan` (PlanSpec.params(), as /privacy/json records it), across the positions computed for it; InputError
    when no ledger document holds the prompt."""
    info, entries = prompt_ledger(docs, prompt_key)
    views = {entry["node"]: _received(entry["prompts"][prompt_key]) for entry in entries}
    computed = max([info["length"]] + [int(v[-1]) + 1 for v in views.values() if len(v)])
    title = f"What each rank received for prompt {prompt_key} (ledger): plan {_plan_text(plan)}, {computed} positions"
    pic = _picture(title, computed, public_prefix, _rows(plan["alpha"], plan["beta"], views))
    pic.prompt_length = info["length"] if computed > info["length"] else None
    return pic


def prompt_ledger(docs: list, prompt_key: str) -> tuple[dict, list]:
    """The prompt's {"length", "plan_length"} and the ranks' entries holding it, from the last batch document
    that has it (a resumed file may hold a batch twice)."""
    for doc in reversed(docs):
        if prompt_key in doc["prompts"]:
            entries = [e for e in doc["ranks"].values() if prompt_key in e["prompts"]]
            return doc["prompts"][prompt_key], entries
    raise InputError(f"no ledger entry for prompt {prompt_key}")


def _received(forms: dict) -> np.ndarray:
    """Every position a rank received for a prompt, over all forms (token ids, q, k, v, partials)."""
    seen = list(ledger_positions(forms).values())
    return sorted_unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)


def _rows(alpha: int, beta: int, views: dict) -> list:
    """A row per worker in rank order (the client left out), labelled 'CompNode 0 · rank 1'."""
    return [Row(f"{r['label']} · rank {r['rank']}", r["node"], np.asarray(views.get(r["node"], []), np.int64))
            for r in rank_layout(alpha, beta) if r["node"] != "client"]


def _picture(title: str, n: int, public_prefix: int, rows: list) -> Picture:
    """Each row's node_report, and δ as the plan report takes it (0 when a node sees every position)."""
    for row in rows:
        row.report = node_report(row.view, n, public_prefix)
    if any(row.report["sees_all"] for row in rows):
        delta = 0.0
    else:
        delta = min((row.report["min_gap"] for row in rows), default=INF)
    return Picture(title, n, public_prefix, rows, delta)


def _plan_text(p: dict) -> str:
    text = f"{p['scheme']} α={p['alpha']} β={p['beta']} c={p['c']} c_a={p['c_a']}"
    return text + (f" seed={p['seed']}" if p["scheme"] == "random" else "")


# ------------------------------------------------------------------------------------------ cells
def cell_states(pic: Picture) -> np.ndarray:
    """(rows, n) cell states: seen (by a CompNode or an AttnNode), public prefix, gap before a later run
    (DELTA_GAP where it equals δ), else unseen."""
    states = np.full((len(pic.rows), pic.n), UNSEEN, dtype=np.int8)
    for r, row in enumerate(pic.rows):
        for start, gap in _later_gaps(row, pic.public_prefix):
            states[r, start - gap:start] = DELTA_GAP if gap == pic.delta else GAP
        states[r, row.view[row.view < pic.n]] = SEEN_COMP if row.node.startswith("comp") else SEEN_ATTN
        states[r, :min(pic.public_prefix, pic.n)] = PUBLIC
    return states


def _later_gaps(row: Row, public_prefix: int) -> list:
    """(run start, gap) of every run after the row's first one with a gap (the first run is first-run exposure,
    left out of δ)."""
    starts, _, gaps = view_runs(row.view, public_prefix)
    return [(int(s), int(g)) for s, g in zip(starts[1:], gaps[1:]) if g > 0]


# ------------------------------------------------------------------------------------------ drawing
def picture_format(path) -> str:
    """'png' or 'svg' from the file name; an InputError for anything else."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise InputError(f"--picture {path}: name a .png or .svg file")
    return fmt


def draw(pic: Picture, path) -> Path:
    """Write the picture to path (.png or .svg); InputError when matplotlib is missing or the file cannot be
    written."""
    fmt = picture_format(path)
    fig = _figure(pic)
    try:
        fig.savefig(path, format=fmt, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise InputError(f"cannot write picture {path}: {exc.strerror or exc}") from exc
    return Path(path)


def _matplotlib():
    """matplotlib's Figure on the Agg canvas, imported only here."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise InputError("pictures need matplotlib: pip install 'rshard_hpc[plot]' (or pip install matplotlib)") \
            from exc
    return Figure, FigureCanvasAgg


def _figure(pic: Picture):
    Figure, FigureCanvasAgg = _matplotlib()
    n_rows = len(pic.rows)
    width = min(max(4.0 + 0.2 * pic.n, 8.0), 18.0)
    fig = Figure(figsize=(width, min(2.2 + 0.3 * n_rows, 40.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _draw_cells(ax, pic)
    _draw_labels(ax, pic)
    if pic.n <= LABELLED_GAPS_UP_TO:
        _draw_gaps(ax, pic)
    _draw_marks(ax, pic)
    _draw_legend(ax, pic)
    return fig


def _draw_cells(ax, pic: Picture) -> None:
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap(COLORS)
    ax.imshow(cell_states(pic), cmap=cmap, norm=BoundaryNorm(np.arange(len(COLORS) + 1) - 0.5, len(COLORS)),
              aspect="auto", interpolation="nearest", extent=(-0.5, pic.n - 0.5, len(pic.rows) - 0.5, -0.5))
    if pic.n <= LABELLED_GAPS_UP_TO:  # white lines between cells
        ax.set_xticks(np.arange(-0.5, pic.n, 1.0), minor=True)
        ax.set_yticks(np.arange(-0.5, len(pic.rows), 1.0), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _draw_labels(ax, pic: Picture) -> None:
    """Node labels down the left, positions along the bottom, the fraction seen down the right."""
    from matplotlib.ticker import MaxNLocator

    ax.set_yticks(range(len(pic.rows)))
    ax.set_yticklabels([row.label for row in pic.rows], fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(pic.n, 20), integer=True))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlim(-0.5, pic.n - 0.5)
    ax.set_xlabel("token position", fontsize=9)
    ax.set_title(f"{pic.title} — δ = {_delta_text(pic.delta)}", fontsize=10, loc="left", pad=14)
    trans = ax.get_yaxis_transform()
    for r, row in enumerate(pic.rows):
        whole = row.report["sees_all"]
        text = f"{100 * row.report['fraction_seen']:.0f}% seen" + (": all" if whole else "")
        ax.text(1.01, r, text, transform=trans, fontsize=8, va="center", color="#b00000" if whole else "black")


def _draw_gaps(ax, pic: Picture) -> None:
    """The length of each gap before a later run, written in the gap; those equal to δ outlined in red."""
    from matplotlib.patches import Rectangle

    for r, row in enumerate(pic.rows):
        for start, gap in _later_gaps(row, pic.public_prefix):
            smallest = gap == pic.delta
            ax.text(start - (gap + 1) / 2, r, str(gap), ha="center", va="center", fontsize=7,
                    color="#8b0000" if smallest else "#6b5000", fontweight="bold" if smallest else "normal")
            if smallest:
                ax.add_patch(Rectangle((start - gap - 0.5, r - 0.45), gap, 0.9, fill=False, edgecolor="#c00000",
                                       linewidth=1.2))


def _draw_marks(ax, pic: Picture) -> None:
    """The end of the public prefix, and where a prompt ends and the generated tokens begin."""
    top = -0.5
    attn = [r for r, row in enumerate(pic.rows) if row.node.startswith("attn")]
    if attn and attn[0] > 0:  # CompNodes above, AttnNodes below
        ax.axhline(attn[0] - 0.5, color="black", linewidth=1.0)
    if pic.public_prefix:
        x = min(pic.public_prefix, pic.n) - 0.5
        ax.axvline(x, color="#555555", linewidth=1.2, linestyle="--")
        ax.annotate("public prefix", (x, top), xytext=(0, 3), textcoords="offset points", ha="right", va="bottom",
                    fontsize=7, color="#555555", annotation_clip=False)
    if pic.prompt_length is not None:
        x = pic.prompt_length - 0.5
        ax.axvline(x, color="#2a7a2a", linewidth=1.2, linestyle=":")
        ax.annotate("generated →", (x, top), xytext=(3, 3), textcoords="offset points", ha="left", va="bottom",
                    fontsize=7, color="#2a7a2a", annotation_clip=False)


def _delta_text(delta: float) -> str:
    return "∞" if delta == INF else f"{delta:g}"


def _draw_legend(ax, pic: Picture) -> None:
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy

    delta = _delta_text(pic.delta) + (" (no node has a later run)" if pic.delta == INF else "")
    handles = [Patch(color=COLORS[SEEN_COMP], label="seen by a CompNode"),
               Patch(color=COLORS[SEEN_ATTN], label="seen by an AttnNode"),
               Patch(color=COLORS[GAP], label="gap before a later run (its length)"),
               Patch(facecolor=COLORS[DELTA_GAP], edgecolor="#c00000", label="gap = δ, the smallest"),
               Patch(color=COLORS[UNSEEN], label="unseen")]
    if pic.public_prefix:
        handles.append(Patch(color=COLORS[PUBLIC], label="public prefix (known to all)"))
    title = f"δ = {delta}: the smallest gap before a node's later run. Right: the share of positions each node sees"
    ax.legend(handles=handles, title=title, loc="upper left", bbox_to_anchor=(0.0, 0.0),
              bbox_transform=offset_copy(ax.transAxes, ax.figure, y=-30, units="points"), ncol=3, fontsize=8,
              title_fontsize=9, frameon=False, alignment="left")
