"""Per-stream timelines of one layer as a PNG (needs matplotlib: the `plot` extra)."""
from __future__ import annotations

import pathlib

import matplotlib

COLORS = {"dispatch": "tab:blue", "combine": "tab:orange", "experts": "tab:green",
          "shared": "tab:olive", "attention": "tab:purple"}


def plot_timelines(timelines: dict, path: pathlib.Path) -> None:
    """timelines: title -> list of schedule.Task; one panel each, a row per stream."""
    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 1.6 * len(timelines) + 0.6),
                             sharex=True, squeeze=False)
    for ax, (title, tasks) in zip(axes[:, 0], timelines.items()):
        for row, stream in enumerate(("comm", "compute")):
            for t in tasks:
                if t.stream == stream:
                    ax.broken_barh([(t.start_us, t.end_us - t.start_us)], (row - 0.4, 0.8),
                                   color=COLORS.get(t.name, "grey"), edgecolor="black")
                    ax.text((t.start_us + t.end_us) / 2, row, f"{t.name[0].upper()}{t.chunk}",
                            ha="center", va="center", fontsize=7)
        ax.set_yticks([0, 1], ["comm", "compute"])
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("us")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
