"""``qlora-kit report``'s rendering: a results dictionary (see :func:`qlora_kit.bench.run_bench`) as Markdown
with one SVG per plot, and as one self-contained HTML page (plots inline; matplotlib PNGs when installed)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from pathlib import Path


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "s":
        return str(value)
    if kind == "bytes":
        for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= div:
                return f"{value / div:.2f} {unit}"
        return f"{value} B"
    if kind == "dict":
        return ", ".join(f"b{k}: {v:.0f}" for k, v in value.items())
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, kind)


def render_markdown(results: dict, plot_files: dict[str, str] | None = None) -> str:
    """The results as Markdown: environment, then per section its protocol, table, checked bars, notes, plots."""
    env = results["env"]
    lines = [f"# qlora-kit method comparison ({env.get('device_type')}{', quick' if results.get('quick') else ''})", ""]
    lines.append("Device: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    lines.append(
        f"Run: {results.get('started')}, {results.get('wall_seconds')} s in all"
        f"{' (reference models loaded from the cache)' if results.get('cached') else ''}."
    )
    if results.get("missing"):
        lines.append(f"Peers not installed (skipped): {', '.join(results['missing'])}.")
    if env.get("device_type") == "cpu":
        lines.append(
            "CPU timings (quantization time, throughput, peak memory) are single runs of the PyTorch "
            "reference path (weights dequantized on every call), on whatever else the machine was doing: "
            "indicative only. The fused kernels run on CUDA."
        )
    lines.append("")
    for sec in results["sections"]:
        lines += [f"## {sec['title']}", ""]
        lines += [f"- {p}" for p in sec["protocol"]]
        lines.append("")
        cols = sec["columns"]
        lines.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        lines.append("|" + "|".join("---" if k == "s" else "---:" for _, _, k in cols) + "|")
        for row in sec["rows"]:
            lines.append("| " + " | ".join(_fmt(row.get(key), kind) for key, _, kind in cols) + " |")
        lines.append("")
        if sec["bars"]:
            lines.append("Expected results (from the issue), checked on these numbers:")
            lines.append("")
            for bar in sec["bars"]:
                lines.append(f"- {'PASS' if bar['passed'] else 'FAIL'}: {bar['name']}: {bar['detail']}")
            lines.append("")
        for note in sec["notes"]:
            lines.append(f"- {note}")
        if sec["notes"]:
            lines.append("")
        for i, _ in enumerate(sec.get("plots", [])):
            name = (plot_files or {}).get(f"{sec['key']}_{i}")
            if name:
                lines += [f"![{sec['plots'][i]['title']}]({name})", ""]
        if sec.get("info"):
            lines.append(f"Reference model: `{json.dumps(sec['info'], sort_keys=True)}`")
            lines.append("")
    return "\n".join(lines)


_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        if t >= lo - 1e-9 * step:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _plot_series(sec: dict, plot: dict) -> list[tuple[str, list[tuple[float, float]], bool]]:
    """(label, points, connect) series of one plot spec."""
    series = []
    # trained rows (QAT and its control) moved away from the float model, and peers measured through
    # dequantized float weights have no speed of their own: both would mislead on these axes
    skip = {"quality_vs_bits": ("qat", "control"), "throughput_vs_batch": ("peer", "control")}[plot["kind"]]
    rows = [r for r in sec["rows"] if r.get("family") not in skip]
    if plot["kind"] == "quality_vs_bits":
        for row in rows:
            y = row.get(plot["y"])
            if y is None or (isinstance(y, float) and math.isinf(y)):
                continue
            x = row.get("bits") or 32.0
            series.append((row["method"], [(float(x), float(y))], False))
    else:
        for row in rows:
            d = row.get(plot["key"]) or {}
            pts = [(float(k), float(v)) for k, v in d.items()]
            if pts:
                series.append((row["method"], sorted(pts), True))
    return series


def svg_plot(
    series, *, title: str, xlabel: str, ylabel: str, width: int = 640, height: int = 380, logx: bool = False
) -> str:
    """A self-contained SVG chart: points (or lines) per series, axes with ticks, and a legend."""
    left, right, top, bottom = 70, 210, 34, 50
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for _, pts, _ in series for p in pts]
    ys = [p[1] for _, pts, _ in series for p in pts]
    if not xs:
        return ""
    fx = (lambda v: math.log2(v)) if logx else (lambda v: v)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    y_lo, y_hi = min(ys), max(ys)
    pad_x = (x_hi - x_lo) * 0.08 or 1.0
    pad_y = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.05 or 1.0
    x_lo, x_hi, y_lo, y_hi = x_lo - pad_x, x_hi + pad_x, y_lo - pad_y, y_hi + pad_y

    def px(v):
        return left + (fx(v) - x_lo) / (x_hi - x_lo) * pw

    def py(v):
        return top + ph - (v - y_lo) / (y_hi - y_lo) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + pw / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>',
    ]
    for t in _nice_ticks(y_lo, y_hi):
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    xticks = sorted(set(xs)) if logx else _nice_ticks(x_lo, x_hi)
    for t in xticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(
        f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    for i, (label, pts, connect) in enumerate(series):
        color = _PALETTE[i % len(_PALETTE)]
        if connect and len(pts) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y in pts:
            out.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}">'
                f"<title>{html.escape(label)}: ({x:g}, {y:g})</title></circle>"
            )
        ly = top + 8 + i * 15
        out.append(f'<circle cx="{left + pw + 14}" cy="{ly}" r="4" fill="{color}"/>')
        out.append(f'<text x="{left + pw + 22}" y="{ly + 4}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _matplotlib_png(series, *, title, xlabel, ylabel, logx=False) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for label, pts, connect in series:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", linestyle="-" if connect else "none", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plots(results: dict):
    """{plot id: (title, svg text, png bytes or None)} for every plot of every section."""
    out = {}
    for sec in results["sections"]:
        for i, plot in enumerate(sec.get("plots", [])):
            series = _plot_series(sec, plot)
            if not series:
                continue
            logx = plot["kind"] == "throughput_vs_batch"
            kw = dict(title=plot["title"], xlabel=plot["xlabel"], ylabel=plot["ylabel"], logx=logx)
            out[f"{sec['key']}_{i}"] = (plot["title"], svg_plot(series, **kw), _matplotlib_png(series, **kw))
    return out


def _figure(title: str, svg: str, png: bytes | None) -> str:
    if png is not None:
        data = base64.b64encode(png).decode()
        return f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}"/></figure>'
    return f"<figure>{svg}</figure>"


def render_html(results: dict, markdown_text: str, plots, files: dict[str, str]) -> str:
    """A self-contained HTML page: the Markdown's tables and text, each plot inline where the Markdown links it."""
    by_file = {name: pid for pid, name in files.items()}
    chunks, pending = [], []
    for line in markdown_text.splitlines():
        m = re.match(r"!\[[^\]]*\]\(([^)]*)\)", line)
        if m and by_file.get(m.group(1)) in plots:
            chunks.append(_markdown_to_html("\n".join(pending)))
            chunks.append(_figure(*plots[by_file[m.group(1)]]))
            pending = []
        else:
            pending.append(line)
    chunks.append(_markdown_to_html("\n".join(pending)))
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 8px}th{background:#f4f4f4}td.num{text-align:right}code{font-size:11px;"
        "word-break:break-all}.pass{color:#1a7f37}.fail{color:#cf222e}figure{display:inline-block;margin:8px}"
    )
    title = html.escape(markdown_text.splitlines()[0].lstrip("# "))
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
        f"</head><body>\n{''.join(chunks)}\n</body></html>\n"
    )


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    text = re.sub(r"^(PASS)", r"<b class='pass'>\1</b>", text)
    return re.sub(r"^(FAIL)", r"<b class='fail'>\1</b>", text)


def _markdown_to_html(md: str) -> str:
    """The small Markdown subset render_markdown writes: headings, paragraphs, bullet lists, tables."""
    out, in_list, table = [], False, []

    def flush_table():
        if not table:
            return
        head = [c.strip() for c in table[0].strip("|").split("|")]
        aligns = [c.strip().endswith(":") for c in table[1].strip("|").split("|")]
        rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
        for line in table[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(
                "<tr>"
                + "".join(
                    f"<td class='{'num' if a else ''}'>{html.escape(c)}</td>"
                    for c, a in zip(cells, aligns, strict=False)
                )
                + "</tr>"
            )
        out.append("<table>" + "".join(rows) + "</table>")
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush_table()
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def write_report(results: dict, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write ``<stem>.md`` (+ one SVG per plot) and the self-contained ``<stem>.html``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(results)
    files = {}
    for pid, (_, svg, _) in plots.items():
        name = f"{stem}_{pid}.svg"
        (out_dir / name).write_text(svg)
        files[pid] = name
    md = render_markdown(results, files)
    paths = {"markdown": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}
    paths["markdown"].write_text(md)
    paths["html"].write_text(render_html(results, md, plots, files))
    return paths
