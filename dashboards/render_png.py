"""Render the main panels of dashboards/kubetune.json as a PNG (matplotlib), from real data.

Two halves:

- `collect_panel_data(prometheus_url, namespace, job, start, end)` evaluates the queries of
  the main panels (taken from kubetune.json, so the picture shows what the dashboard shows)
  through Prometheus' HTTP API and returns plain JSON;
- ``python dashboards/render_png.py panels.json docs/dashboard.png`` draws that JSON.

docs/dashboard.png comes from the metrics tests' tiny training run::

    KUBETUNE_PANEL_DATA=/tmp/panels.json pytest tests/metrics -k render_png
    python dashboards/render_png.py /tmp/panels.json docs/dashboard.png
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).with_name("kubetune.json")

# (panel title in kubetune.json, y label, scale applied to values)
MAIN_PANELS = [
    ("Loss over time", "loss", 1.0),
    ("Learning rate", "learning rate", 1.0),
    ("Throughput", "per second", 1.0),
    ("Progress", "percent", 1.0),
    ("GPU memory per pod", "MiB", 1 / 2**20),
    ("Host memory per pod", "MiB", 1 / 2**20),
    ("Checkpoint size and uploaded bytes", "MiB", 1 / 2**20),
    ("Checkpoint upload duration", "seconds", 1.0),
]


def _legend(fmt: str, labels: dict) -> str:
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    while "{{" in out:  # labels the series does not have
        a = out.index("{{")
        b = out.index("}}", a)
        out = out[:a] + out[b + 2:]
    return " ".join(out.split()) or labels.get("__name__", "")


def collect_panel_data(prometheus_url: str, namespace: str, job: str, start: float,
                       end: float, step: float = 1.0, note: str = "") -> dict:
    dash = json.loads(DASHBOARD.read_text())
    by_title = {}
    for p in dash["panels"]:
        for q in [p, *p.get("panels", [])]:
            by_title[q["title"]] = q
    panels = []
    for title, ylabel, scale in MAIN_PANELS:
        panel = by_title[title]
        series = []
        for target in panel["targets"]:
            expr = (target["expr"].replace("$namespace", namespace).replace("$job", job)
                    .replace("$__rate_interval", "30s"))
            url = (f"{prometheus_url}/api/v1/query_range?"
                   + urllib.parse.urlencode({"query": expr, "start": start, "end": end,
                                             "step": step}))
            with urllib.request.urlopen(url, timeout=10) as r:
                result = json.load(r)["data"]["result"]
            for item in result:
                series.append({"name": _legend(target.get("legendFormat", ""), item["metric"]),
                               "t": [float(t) - start for t, _ in item["values"]],
                               "v": [float(v) * scale for _, v in item["values"]]})
        panels.append({"title": title, "ylabel": ylabel, "series": series})
    return {"job": job, "namespace": namespace, "note": note, "panels": panels}


def render(doc: dict, out: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = doc["panels"]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.1 * rows), squeeze=False)
    note = f" ({doc['note']})" if doc.get("note") else ""
    fig.suptitle(f"kubetune dashboard: FineTuneJob {doc['namespace']}/{doc['job']}{note}",
                 fontsize=12)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=10, loc="left")
        for s in panel["series"]:
            ax.plot(s["t"], s["v"], label=s["name"], linewidth=1.4,
                    marker="o" if len(s["t"]) < 12 else None, markersize=3)
        ax.set_ylabel(panel["ylabel"], fontsize=8)
        ax.set_xlabel("seconds since start", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel["series"]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data (no GPU in this run)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    render(json.loads(Path(argv[0]).read_text()), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
