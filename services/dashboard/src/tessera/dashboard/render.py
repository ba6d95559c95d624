"""HTML of the pages: a shell (navigation, the live-update script) around each page's main section.

The main section alone is what the page's script fetches again when a change event arrives, so that a page
updates without a reload. Every value from the cluster is escaped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from html import escape
from typing import Any

from tessera.dashboard.model import PAGES, TITLES


def _e(v: Any) -> str:
    return escape(str(v), quote=True)


def size(n: float | int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"  # pragma: no cover - the loop returns


def when(ms: float | int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def short(hex_id: str, n: int = 12) -> str:
    return f'<code title="{_e(hex_id)}">{_e(hex_id[:n])}</code>' if hex_id else "-"


def link(url: str, text: str) -> str:
    return f'<a href="{_e(url)}" target="_blank" rel="noopener">{_e(text)}</a>' if url else _e(text)


def table(cols: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "", test_id: str = "") -> str:
    """``rows`` hold HTML already escaped (cells are built with the helpers above)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attrs = (f' class="{cls}"' if cls else "") + (f' data-testid="{test_id}"' if test_id else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body or _empty(len(cols))}</tbody></table>"


def _empty(n: int) -> str:
    return f'<tr><td colspan="{n}" class="none">none</td></tr>'


def states(counts: dict[str, int]) -> str:
    return " ".join(f'<span class="state s-{_e(k)}">{_e(k)} {v}</span>' for k, v in counts.items()) or "-"


def stat(label: str, value: Any, test_id: str) -> str:
    return f'<div class="stat"><div class="v" data-testid="{test_id}">{_e(value)}</div><div class="l">{_e(label)}</div></div>'


def chart(chart_id: str, title: str, data: dict[str, list[Any]], series: Sequence[str]) -> str:
    """A uPlot chart drawn by dashboard.js from the JSON beside it (x: ``data["t"]``, one line per series)."""
    spec = json.dumps({"title": title, "x": data["t"], "series": [{"label": s, "y": data[s]} for s in series]})
    return (f'<div class="chart" id="{chart_id}"></div>'
            f'<script type="application/json" class="chart-data" data-for="{chart_id}">{escape(spec, quote=False)}'
            "</script>")


# --------------------------------------------------------------------------------------------------- pages


def cluster(m: dict[str, Any]) -> str:
    res = table(["resource", "total", "available"],
                ([_e(r["name"]), f"{r['total']:g}", f"{r['available']:g}"] for r in m["resources"]))
    nodes = table(["node", "state", "address", "resources", "available", "last heartbeat"],
                  ([short(n["node_id"]), _e(n["state"]), _e(n["address"]),
                    _e(", ".join(f"{k} {v:g}" for k, v in sorted(n["resources_total"].items()))),
                    _e(", ".join(f"{k} {v:g}" for k, v in sorted(n["resources_available"].items()))),
                    when(n["last_heartbeat_ms"])] for n in m["nodes"]), test_id="nodes")
    rows = []
    for s in m["services"]:
        for i in s["instances"]:
            rows.append([_e(s["name"]), _e(i["address"]), _e(i["http_address"] or "-"),
                         f'<span class="health h-{_e(i["health"])}">{_e(i["health"])}</span>', _e(i["pid"]),
                         _e(i["hostname"]), link(i["metrics_url"], "metrics") if i["metrics_url"] else "-"])
    services = table(["service", "address", "HTTP", "health", "pid", "host", "metrics"], rows, test_id="services")
    summary = "".join(stat(f"{s['name']} replicas ({s['serving']} serving)", s["replicas"], f"replicas-{s['name']}")
                      for s in m["services"])
    return (f'<section class="stats">{stat("alive nodes", m["alive_nodes"], "alive-nodes")}{summary}</section>'
            f"<h2>Resources</h2>{res}<h2>Nodes</h2>{nodes}<h2>Services</h2>{services}")


def _task_row(t: dict[str, Any]) -> list[str]:
    return [short(t["task_id"], 16), _e(t["name"]), f'<span class="state s-{_e(t["state"])}">{_e(t["state"])}</span>',
            _e(t["type"]), short(t["node_id"], 8), _e(t["attempt_number"]), when(t["updated_ms"]),
            link(t["trace_url"], "trace") if t["trace_url"] else "-"]


def _last_line(text: str) -> str:
    """A traceback's last line: the exception and its message."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def tasks(m: dict[str, Any]) -> str:
    funcs = table(["function", "tasks", "states"],
                  ([_e(f["name"]), _e(f["total"]), states(f["states"])] for f in m["by_function"]), test_id="by-function")
    failures = "".join(
        f'<details class="failure" data-task-id="{_e(t["task_id"])}"><summary>{_e(t["name"])} {short(t["task_id"], 16)} '
        f'<span class="why">{_e(_last_line(t["error"]))}</span> {link(t["trace_url"], "trace") if t["trace_url"] else ""}'
        f'</summary><pre>{_e(t["error"] or "(no error text recorded)")}</pre></details>'
        for t in m["failures"]) or '<p class="none">none</p>'
    task_rows = table(["task", "function", "state", "type", "node", "attempt", "updated", "trace"],
                      (_task_row(t) for t in m["tasks"]), test_id="tasks")
    classes = table(["class", "actors", "states"],
                    ([_e(c["name"]), _e(c["total"]), states(c["states"])] for c in m["by_class"]), test_id="by-class")
    actors = table(["actor", "class", "name", "state", "node", "restarts", "death cause"],
                   ([short(a["actor_id"], 16), _e(a["class_name"]), _e(a["name"] or "-"),
                     f'<span class="state s-{_e(a["state"])}">{_e(a["state"])}</span>', short(a["node_id"], 8),
                     _e(a["restarts"]), _e(a["death_cause"] or "-")] for a in m["actors"]), test_id="actors")
    return (f'<section class="stats">{stat("tasks", m["total"], "tasks-total")}'
            f'{stat("failed", m["states"].get("FAILED", 0), "tasks-failed")}'
            f'{stat("actors", m["actors_total"], "actors-total")}</section>'
            f'<p>Task states: {states(m["states"])} &nbsp; Actor states: {states(m["actor_states"])}</p>'
            + chart("chart-throughput", "tasks ended per second", m["chart"], ["finished", "failed"])
            + f"<h2>Per function</h2>{funcs}<h2>Failures</h2><div data-testid=\"failures\">{failures}</div>"
            f"<h2>Tasks</h2>{task_rows}<h2>Actors per class</h2>{classes}<h2>Actors</h2>{actors}")


def objects(m: dict[str, Any]) -> str:
    owners = table(["owner (process)", "job", "objects", "memory"],
                   ([_e(o["owner"]), short(o["job_id"], 8), _e(o["objects"]), size(o["bytes"])] for o in m["by_owner"]),
                   test_id="by-owner")
    nodes = table(["node", "objects", "memory"],
                  ([short(n["node_id"]), _e(n["objects"]), size(n["bytes"])] for n in m["by_node"]), test_id="by-node")
    rows = table(["object", "size", "reference", "owned", "process", "nodes", "spilled"],
                 ([short(r["object_id"], 20), size(r["object_size"]), _e(r["reference_type"]), _e(r["owned"]),
                   _e(r["process"]), _e(", ".join(n[:8] for n in r["nodes"]) or "-"), _e(r["spilled"])]
                  for r in m["rows"]), test_id="objects")
    spilled = f"{m['spilled_objects']} ({size(m['spilled_bytes'])})"
    return (f'<section class="stats">{stat("objects", m["objects"], "objects-total")}'
            f'{stat("references", m["references"], "references-total")}'
            f'{stat("memory", size(m["total_bytes"]), "objects-bytes")}'
            f'{stat("spilled", spilled, "objects-spilled")}</section>'
            f"<h2>Memory by owner</h2>{owners}<h2>Memory by node</h2>{nodes}<h2>References</h2>{rows}")


def _slices(j: dict[str, Any], origin: float, span: float, now: float) -> str:
    """A job's time slices on GPUs: one bar per placement, coloured by node, hatched while packed."""
    nodes = sorted({h["node_id"] for h in j["history"]})
    out = []
    for h in j["history"]:
        start, end = h["start"] - origin, (h["end"] or now) - origin
        how = f'packed with {h["packed_with"]}' if h["packed_with"] else "alone"
        until = f'; then {h["ended_by"]}' if h["ended_by"] else "; running"
        out.append(f'<span class="run slice node-{nodes.index(h["node_id"]) % 4}{" packed" if h["packed_with"] else ""}" '
                   f'data-node="{_e(h["node_id"])}" data-ended-by="{_e(h["ended_by"])}" '
                   f'style="left:{100 * start / span:.2f}%;width:{max(0.3, 100 * (end - start) / span):.2f}%" '
                   f'title="node {_e(h["node_id"][:8])} GPUs {_e(h["gpu_slots"])}, {_e(how)}, '
                   f'{end - start:.1f}s{_e(until)}"></span>')
    return "".join(out)


def gpu(m: dict[str, Any]) -> str:
    span = m["span_s"]
    bars = []
    for j in m["jobs"]:
        start = (j["started_at"] or j["submitted_at"]) - m["origin"]
        end = (j["finished_at"] or j["last_ran_at"] or j["started_at"] or j["submitted_at"]) - m["origin"]
        wait = max(0.0, start - (j["submitted_at"] - m["origin"]))
        runs = _slices(j, m["origin"], span, m["origin"] + span) if j["history"] else (
            f'<span class="run s-{_e(j["state"])}" '
            f'style="left:{100 * start / span:.2f}%;width:{max(0.5, 100 * (end - start) / span):.2f}%" '
            f'title="{_e(j["state"])} on {_e(j["node_id"][:8])} GPUs {_e(j["gpu_slots"])}; '
            f'{j["suspensions"]} suspensions, {j["migrations"]} migrations"></span>')
        bars.append(
            f'<div class="lane" data-job-id="{_e(j["job_id"])}"><span class="lane-name">{_e(j["name"] or j["job_id"])}</span>'
            f'<span class="track"><span class="wait" style="left:{100 * (start - wait) / span:.2f}%;'
            f'width:{100 * wait / span:.2f}%"></span>{runs}</span></div>')
    rows = table(["job", "name", "state", "GPUs", "node", "slots", "packed with", "suspensions", "migrations",
                  "mini-batch s", "JCT s", "trace"],
                 ([_e(j["job_id"]), _e(j["name"]), f'<span class="state s-{_e(j["state"])}">{_e(j["state"])}</span>',
                   _e(j["gpus"]), short(j["node_id"], 8), _e(", ".join(map(str, j["gpu_slots"])) or "-"),
                   _e(j["packed_with"] or "-"), _e(j["suspensions"]), _e(j["migrations"]), num(j["minibatch_s"], "{:.3f}"),
                   num(j["jct_s"], "{:.1f}"), link(j["trace_url"], "trace") if j["trace_url"] else "-"]
                  for j in m["jobs"]), test_id="gpu-jobs")
    return (f'<section class="stats">{stat("jobs", len(m["jobs"]), "gpu-jobs-total")}'
            f'{stat("mean JCT (s)", num(m["mean_jct_s"], "{:.1f}"), "gpu-mean-jct")}'
            f'{stat("suspensions", m["suspensions"], "gpu-suspensions")}'
            f'{stat("migrations", m["migrations"], "gpu-migrations")}</section>'
            f'<p>Job states: {states(m["states"])}</p>'
            f'<h2>Timeline</h2><div class="gantt" data-testid="gpu-timeline">{"".join(bars) or "<p class=none>none</p>"}'
            "</div>" + chart("chart-jct", "job completion time (s) by finish time", m["chart"], ["jct"])
            + f"<h2>Jobs</h2>{rows}")


def serving(m: dict[str, Any]) -> str:
    rows = table(["pipeline", "operators", "latency budget ms", "requests", "p50 ms", "p99 ms"],
                 ([_e(p["name"]), _e(p["operators"]), _e(p["latency_budget_ms"]), _e(p["requests"]),
                   num(p["p50_ms"], "{:.3f}"), num(p["p99_ms"], "{:.3f}")] for p in m["pipelines"]), test_id="pipelines")
    def stats(r: dict[str, Any]) -> list[str]:
        s = r["stats"]
        if s is None:
            return ["-"] * 6
        share = "-" if s["reused_share"] is None else f"{100 * s['reused_share']:.0f}%"
        return [_e(s["pipelines"]), f"{_e(s['param_arrays'])} ({size(s['param_bytes'])})", size(s["table_bytes"]),
                _e(s["batches"]), _e(s["rows_computed"]), f"{_e(s['rows_reused'])} ({share})"]

    reps = table(["replica", "HTTP", "metrics", "pipelines", "shared parameters (each kept once)", "vocabulary tables",
                  "batches", "rows featurized", "featurizations reused"],
                 ([_e(r["address"]), _e(r["http_address"] or "-"),
                   link(f"http://{r['metrics_address']}/metrics", "metrics") if r["metrics_address"] else "-",
                   *stats(r)] for r in m["replicas"]), test_id="serving-replicas")
    return (f'<section class="stats">{stat("pipelines", len(m["pipelines"]), "pipelines-total")}'
            f'{stat("replicas", len(m["replicas"]), "serving-replicas-total")}</section>'
            f"<h2>Pipelines</h2>{rows}<p class=\"note\">p50/p99: the replicas' request duration histograms "
            f"({m['replicas_scraped']} of {len(m['replicas'])} scraped), interpolated within buckets.</p>"
            f"<h2>Replicas</h2>{reps}")


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "cluster": cluster, "tasks": tasks, "objects": objects, "gpu": gpu, "serving": serving}


def main(m: dict[str, Any]) -> str:
    """The page's main section: the banner alone when the control store does not answer."""
    if m["store_down"]:
        return (f'<div class="banner" id="store-down" role="alert" data-testid="store-down"><b>Control store '
                f"unavailable.</b> {_e(m['store_down'])}. This page retries by itself and shows the cluster again "
                "as soon as the control store answers.</div>")
    return RENDERERS[m["page"]](m)


def page(m: dict[str, Any]) -> str:
    on = ' class="on"'
    nav = "".join(f'<a href="/{p}"{on if p == m["page"] else ""}>{_e(TITLES[p])}</a>' for p in PAGES)
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Tessera · {_e(TITLES[m['page']])}</title>"
            '<link rel="stylesheet" href="/static/vendor/uPlot.min.css"><link rel="stylesheet" href="/static/dashboard.css">'
            f'</head><body data-page="{_e(m["page"])}"><header><span class="brand">Tessera</span><nav>{nav}</nav>'
            f'<span class="store">control store {_e(m["store"])}</span><span id="live" class="live" title="live updates">'
            f'●</span></header><main id="main">{main(m)}</main>'
            '<script src="/static/vendor/uPlot.iife.min.js"></script><script src="/static/dashboard.js"></script>'
            "</body></html>")


def not_found(name: str) -> str:
    links = ", ".join(f'<a href="/{p}">{_e(p)}</a>' for p in PAGES)
    return (f"<!doctype html><html><head><title>Tessera · not found</title></head><body><p>No page "
            f"{_e(name)!s}; the pages are: {links}.</p></body></html>")
