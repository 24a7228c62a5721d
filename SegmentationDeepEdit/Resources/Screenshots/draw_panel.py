"""Draw the SegmentationDeepEdit panel as a labelled picture (a drawing, not a screenshot).

There is no 3D Slicer on the machines this project is built on, so the README shows this drawing
of the layout in Resources/UI/SegmentationDeepEdit.ui instead of a screenshot. Regenerate it after
changing the .ui file:

    python SegmentationDeepEdit/Resources/Screenshots/draw_panel.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

OUT = Path(__file__).with_name("panel-drawing.png")
OUT_BATCH = Path(__file__).with_name("batch-tab-drawing.png")
W, H = 520, 930
FONT = "DejaVu Sans"


def box(ax, x, y, w, h, text="", fc="#ffffff", ec="#9aa3ad", size=9, color="#1d2733", bold=False, align="left", rounded=False):
    patch = (FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=4", fc=fc, ec=ec, lw=1)
             if rounded else Rectangle((x, y), w, h, fc=fc, ec=ec, lw=1))
    ax.add_patch(patch)
    if text:
        tx = x + 6 if align == "left" else x + w / 2
        ax.text(tx, y + h / 2, text, va="center", ha="left" if align == "left" else "center", fontsize=size,
                color=color, family=FONT, weight="bold" if bold else "normal")


def label(ax, x, y, text, size=9, color="#1d2733", style="normal", weight="normal"):
    ax.text(x, y, text, va="center", ha="left", fontsize=size, color=color, family=FONT, style=style, weight=weight)


def combo(ax, x, y, w, text):
    box(ax, x, y, w, 22, text)
    ax.text(x + w - 10, y + 11, "\u25be", va="center", ha="center", fontsize=9, color="#55606b")


def place(ax, x, y, color):
    box(ax, x, y, 26, 22, fc="#f4f6f8")
    ax.plot([x + 13], [y + 11], marker="o", ms=6, color=color, mec="#333333")
    box(ax, x + 28, y, 14, 22, fc="#f4f6f8")
    ax.text(x + 35, y + 11, "\u25be", va="center", ha="center", fontsize=7, color="#55606b")


def row(ax, y, name, draw):
    label(ax, 22, y + 11, name)
    draw(y)


def canvas(height: int, title: str):
    """A figure of the panel's width with the drawing's title lines; returns (figure, axes)."""
    fig = plt.figure(figsize=(W / 100, height / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, W)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.add_patch(Rectangle((0, 0), W, height, fc="#eef1f4", ec="none"))
    label(ax, 12, 16, f"Drawing of the {title} (not a screenshot)", size=10, color="#b03030", weight="bold")
    label(ax, 12, 34, "Layout of Resources/UI/SegmentationDeepEdit.ui; names and numbers are illustrative", size=8, color="#55606b")
    return fig, ax


def main() -> None:
    fig, ax = canvas(H, "module panel")

    # tabs
    box(ax, 12, 50, 90, 24, "Annotate", fc="#ffffff", bold=True, align="center")
    box(ax, 102, 50, 110, 24, "Auto-segment", fc="#dde2e7", align="center")
    box(ax, 212, 50, 70, 24, "Batch", fc="#dde2e7", align="center")
    box(ax, 12, 74, W - 24, 470, fc="#ffffff")

    x1, w1 = 150, W - 150 - 26
    row(ax, 86, "Input volume:", lambda y: combo(ax, x1, y, w1, "Demo7 T1C"))
    row(ax, 114, "Model:", lambda y: combo(ax, x1, y, w1, "DeepEdit extreme points"))
    label(ax, 22, 146, "Class-agnostic six-extreme-point segmentation (SegResNet) ...", size=8, color="#55606b", style="italic")
    row(ax, 162, "Extreme points:", lambda y: (combo(ax, x1, y, w1 - 50, "ExtremePoints"), place(ax, x1 + w1 - 44, y, "#f2c21b")))
    box(ax, 22, 192, W - 48, 34, fc="#fff8dc", ec="#e0c060")
    label(ax, 30, 203, "Point 4 of 6: click the most posterior (back) edge", size=8.5)
    label(ax, 30, 217, "of the object (any order works).", size=8.5)
    row(ax, 236, "Corrections:", lambda y: (label(ax, x1, y + 11, "Add (+):", size=8.5), place(ax, x1 + 54, y, "#22c03a"),
                                          label(ax, x1 + 112, y + 11, "Remove (-):", size=8.5), place(ax, x1 + 186, y, "#e83a3a")))
    row(ax, 266, "Segmentation:", lambda y: combo(ax, x1, y, w1, "Segmentation"))
    row(ax, 294, "Segment:", lambda y: (combo(ax, x1, y, w1 - 90, "Tumour"), box(ax, x1 + w1 - 84, y, 84, 22, "New object", fc="#f4f6f8", align="center", size=8.5)))
    box(ax, 22, 326, W - 48, 92, fc="#fafbfc")
    label(ax, 30, 338, "\u25be Options", size=9, weight="bold")
    row(ax, 350, "   Device:", lambda y: combo(ax, x1, y, 120, "auto"))
    row(ax, 374, "   Test-time augmentation:", lambda y: box(ax, x1 + 60, y + 4, 14, 14))
    row(ax, 394, "   Update automatically:", lambda y: (box(ax, x1 + 60, y + 4, 14, 14), label(ax, x1 + 62, y + 11, "\u2713", size=9)))
    box(ax, 22, 430, 300, 28, "Segment", fc="#d7e6fb", ec="#6b9be0", bold=True, align="center", rounded=True)
    box(ax, 330, 430, W - 330 - 26, 28, "Load demo case", fc="#f4f6f8", align="center", rounded=True)
    label(ax, 22, 480, "Auto-segment tab: model, one volume selector per model input", size=8, color="#55606b", style="italic")
    label(ax, 22, 496, "(guessed from volume names), output segmentation, device, TTA,", size=8, color="#55606b", style="italic")
    label(ax, 22, 512, "fast mode, Apply.", size=8, color="#55606b", style="italic")

    # progress, cancel, status
    box(ax, 12, 556, W - 110, 22, fc="#ffffff")
    ax.add_patch(Rectangle((13, 557), (W - 112) * 0.62, 20, fc="#8fc1f2", ec="none"))
    ax.text(12 + (W - 110) / 2, 567, "62% inference", va="center", ha="center", fontsize=8.5, family=FONT)
    box(ax, W - 92, 556, 80, 22, "Cancel", fc="#f4f6f8", align="center", rounded=True)
    label(ax, 14, 594, "Tumour: 14.2 ml in 0.74 s on CPU", size=9)

    # segment editor
    box(ax, 12, 612, W - 24, 24, "\u25be Segment Editor", fc="#e4e8ec", bold=True)
    box(ax, 12, 636, W - 24, 282, fc="#ffffff")
    box(ax, 22, 646, W - 44, 24, "  Add   Remove   Show 3D", fc="#f4f6f8", size=8.5)
    box(ax, 22, 676, W - 44, 84, fc="#ffffff")
    for i, (name, color) in enumerate([("Tumour", "#f0a030"), ("Tumour 2", "#50a0e0")]):
        ax.add_patch(Rectangle((30, 684 + 24 * i), 14, 14, fc=color, ec="#333333"))
        label(ax, 52, 691 + 24 * i, name, size=9)
    for i, effect in enumerate(["Paint", "Draw", "Erase", "Level tracing", "Grow from seeds", "Islands", "Scissors", "Smoothing"]):
        cx, cy = 22 + (i % 4) * ((W - 44) / 4), 772 + (i // 4) * 30
        box(ax, cx + 2, cy, (W - 44) / 4 - 4, 26, effect, fc="#f4f6f8", size=8, align="center", rounded=True)
    box(ax, 22, 840, W - 44, 70, fc="#fafbfc")
    label(ax, 30, 856, "Effect options (e.g. Paint: brush diameter, sphere brush)", size=8, color="#55606b", style="italic")
    label(ax, 30, 874, "Undo / redo covers the results written by the model too.", size=8, color="#55606b", style="italic")

    fig.savefig(OUT, dpi=100)
    print(OUT)
    draw_batch_tab()


def draw_batch_tab() -> None:
    """The Batch tab after a run: settings, the study table, load for review."""
    h = 588
    fig, ax = canvas(h, "Batch tab")
    box(ax, 12, 50, 90, 24, "Annotate", fc="#dde2e7", align="center")
    box(ax, 102, 50, 110, 24, "Auto-segment", fc="#dde2e7", align="center")
    box(ax, 212, 50, 70, 24, "Batch", fc="#ffffff", bold=True, align="center")
    box(ax, 12, 74, W - 24, h - 86, fc="#ffffff")
    x1, w1 = 150, W - 150 - 26
    row(ax, 86, "Studies folder:", lambda y: (box(ax, x1, y, w1 - 30, 22, "/data/incoming/2026-11"),
                                             box(ax, x1 + w1 - 26, y, 26, 22, "...", fc="#f4f6f8", align="center")))
    row(ax, 114, "Output folder:", lambda y: (box(ax, x1, y, w1 - 30, 22, "/data/labelled/2026-11"),
                                            box(ax, x1 + w1 - 26, y, 26, 22, "...", fc="#f4f6f8", align="center")))
    row(ax, 142, "Mapping file:", lambda y: (box(ax, x1, y, w1 - 30, 22, "(optional)", color="#8a939c"),
                                            box(ax, x1 + w1 - 26, y, 26, 22, "...", fc="#f4f6f8", align="center")))
    row(ax, 170, "Model:", lambda y: combo(ax, x1, y, w1, "Glioma regions (default)"))
    row(ax, 198, "Parallel studies:", lambda y: box(ax, x1, y, 60, 22, "1"))
    row(ax, 226, "Resume:", lambda y: box(ax, x1, y + 4, 14, 14))
    bw = (W - 48 - 16) / 3
    for i, (text, fc) in enumerate([("Find studies", "#f4f6f8"), ("Run", "#d7e6fb"), ("Cancel", "#f4f6f8")]):
        box(ax, 22 + i * (bw + 8), 256, bw, 26, text, fc=fc, align="center", rounded=True, bold=text == "Run")
    box(ax, 22, 292, W - 44, 20, fc="#ffffff")
    ax.add_patch(Rectangle((23, 293), (W - 46) * 0.67, 18, fc="#8fc1f2", ec="none"))
    ax.text(22 + (W - 44) / 2, 302, "67% 2/3 studies (case-b: done)", va="center", ha="center", fontsize=8.5, family=FONT)
    cols = [("Study", 54), ("Status", 90), ("Sequences", 132), ("Secs", 40), ("QC", W - 44 - 316)]
    rows = [("case-a", "done", "t1c (reference), t2, flair", "31.8", "registration ok; WT=42 mL"),
            ("case-b", "done, review", "t1c (reference), t1, t2", "27.0", "review: 1 flagged; WT=18 mL"),
            ("case-c", "running", "t1c (reference), flair", "", ""),
            ("case-d", "will fail: no T1c", "t2, flair", "", "")]
    y = 322
    x = 22
    for name, w in cols:
        box(ax, x, y, w, 20, name, fc="#e4e8ec", size=8, bold=True)
        x += w
    for r, values in enumerate(rows):
        x = 22
        fc = "#d7e6fb" if r == 1 else "#ffffff"
        for (name, w), v in zip(cols, values):
            box(ax, x, y + 20 * (r + 1), w, 20, v, fc=fc, size=7.5)
            x += w
    box(ax, 22, 432, W - 44, 26, "Load selected study for review", fc="#f4f6f8", align="center", rounded=True)
    label(ax, 22, 474, "3 studies: 2 done, 0 failed, 0 skipped", size=9)
    label(ax, 22, 500, "The same run as  deepedit batch IN -o OUT  (one code path, in a worker", size=8, color="#55606b", style="italic")
    label(ax, 22, 516, "process of its own): Cancel keeps finished studies, Resume finishes the rest.", size=8, color="#55606b", style="italic")
    label(ax, 22, 532, "Load: registered volumes + segmentation, ready for the Segment Editor.", size=8, color="#55606b", style="italic")
    fig.savefig(OUT_BATCH, dpi=100)
    print(OUT_BATCH)


if __name__ == "__main__":
    main()
