"""A trace as a timeline: one bar per span, indented under its parent, coloured by kind; links dashed."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan

COLOURS = {"SERVER": "#4c72b0", "CLIENT": "#55a868", "PRODUCER": "#dd8452", "CONSUMER": "#8172b3", "INTERNAL": "#999"}


def ordered(spans: Sequence[ReadableSpan]) -> list[tuple[int, ReadableSpan]]:
    """Depth-first from the roots, children by start time: (depth, span)."""
    ids = {s.context.span_id for s in spans}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    out: list[tuple[int, ReadableSpan]] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            out.append((depth, span))
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return out


def describe(spans: Sequence[ReadableSpan]) -> str:
    start = min(s.start_time or 0 for s in spans)
    lines = []
    for depth, span in ordered(spans):
        ms = ((span.start_time or 0) - start) / 1e6
        took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        error = (span.attributes or {}).get("error.type")
        extra = f"  error.type={error}" if error else ""
        extra += "  (linked to the first attempt)" if span.links else ""
        lines.append(f"{ms:8.1f} ms {took:7.1f} ms  {'  ' * depth}{span.kind.name:<8} {span.name}{extra}")
    return "\n".join(lines)


def draw(spans: Sequence[ReadableSpan], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    rows = ordered(spans)
    start = min(s.start_time or 0 for s in spans)
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(rows) + 1.4))
    fig.subplots_adjust(left=0.36, right=0.98, top=0.92, bottom=0.1)
    labels = blended_transform_factory(fig.transFigure, ax.transData)  # x across the figure, y by row
    y_of: dict[int, int] = {}
    for y, (depth, span) in enumerate(rows):
        y_of[span.context.span_id] = y
        left = ((span.start_time or 0) - start) / 1e6
        width = max(((span.end_time or 0) - (span.start_time or 0)) / 1e6, 0.8)
        failed = "error.type" in (span.attributes or {})
        ax.barh(y, width, left=left, height=0.6, color=COLOURS.get(span.kind.name, "#999"),
                edgecolor="#c44e52" if failed else "none", linewidth=2 if failed else 0)  # fmt: skip
        label = f"{'   ' * depth}{span.kind.name.lower()}  {span.name}" + ("  ✗" if failed else "")
        ax.text(0.01, y, label, transform=labels, ha="left", va="center", fontsize=8,
                family="monospace")  # fmt: skip
    for span in spans:
        for link in span.links:
            if link.context.span_id in y_of:
                y0, y1 = y_of[link.context.span_id], y_of[span.context.span_id]
                x = ((span.start_time or 0) - start) / 1e6
                ax.annotate("", xy=(x, y0), xytext=(x, y1),
                            arrowprops={"arrowstyle": "->", "linestyle": "--", "color": "#c44e52"})  # fmt: skip
                ax.text(
                    x, (y0 + y1) / 2, "link to the first attempt ", fontsize=7, color="#c44e52", va="center", ha="right"
                )
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the trace started")
    trace_ids = {format(s.context.trace_id, "032x")[:12] for s in spans}
    ax.set_title(
        f"one trace ({', '.join(sorted(trace_ids))}…): gateway → RPC → event → task, retried once", fontsize=10
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()][:4]
    ax.legend(handles, [k.lower() for k in list(COLOURS)[:4]], loc="upper right", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
