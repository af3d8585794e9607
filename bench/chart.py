"""The ratio chart of the benchmark report: one horizontal bar per case, vdisk median / qemu-img
median, as a self-contained SVG (no plotting library; python3 standard library only).

Bars are clipped at MAX_RATIO (the label keeps the true value). Dashed lines mark parity (1.0) and
the issue's targets: 0.5 for commands, 1/1.2 for `bench` I/O (at least 1.2x qemu-img's IOPS). A bar is
green when the case meets its target, amber when vdisk is faster but short of the target, red when
qemu-img is faster.
"""

from xml.sax.saxutils import escape

MAX_RATIO = 2.0
ROW = 18
LABEL_W = 430
BAR_W = 420
TOP = 40
IO_TARGET = 1 / 1.2
COMMAND_TARGET = 0.5


def case_target(case):
    """The ratio a case should reach: the IOPS target for `bench` cases, 0.5 otherwise."""
    return IO_TARGET if case.get("requests") else COMMAND_TARGET


def bar_colour(ratio, target):
    """Green when the target is met, amber when vdisk is faster but short of it, red otherwise."""
    if ratio <= target:
        return "#2e7d32"
    if ratio < 1.0:
        return "#f9a825"
    return "#c62828"


def write_ratio_chart(cases, path):
    """Writes the chart of every case that has a ratio to `path`."""
    rows = [c for c in cases if c.get("ratio_vdisk_qemu") is not None]
    height = TOP + ROW * len(rows) + 40
    width = LABEL_W + BAR_W + 70
    scale = BAR_W / MAX_RATIO
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">'
        "vdisk time / qemu-img time per case (lower is better)</text>",
    ]
    for i, c in enumerate(rows):
        y = TOP + i * ROW
        ratio = c["ratio_vdisk_qemu"]
        title = c["title"] if len(c["title"]) <= 72 else c["title"][:71] + "…"
        out.append(f'<text x="{LABEL_W - 6}" y="{y + 12}" text-anchor="end">{escape(title)}</text>')
        w = min(ratio, MAX_RATIO) * scale
        out.append(f'<rect x="{LABEL_W}" y="{y + 2}" width="{w:.1f}" height="{ROW - 5}" '
                   f'fill="{bar_colour(ratio, case_target(c))}"/>')
        out.append(f'<text x="{LABEL_W + w + 4:.1f}" y="{y + 12}">{ratio:.2f}</text>')
    bottom = TOP + ROW * len(rows)
    for mark, label in ((COMMAND_TARGET, "0.5 target"), (IO_TARGET, "1/1.2 (I/O target)"), (1.0, "parity")):
        x = LABEL_W + mark * scale
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{bottom}" stroke="#555" '
                   'stroke-dasharray="4,3"/>')
        anchor_y = bottom + 14 if mark != IO_TARGET else bottom + 28
        out.append(f'<text x="{x:.1f}" y="{anchor_y}" text-anchor="middle" fill="#555">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
