"""What each page shows, computed from the cluster's state (the domain: no gRPC, no NATS, no HTTP).

Every page model is a JSON-ready dict. The figures come through a :class:`Source` (``source.py`` reads the
control store with the state API); when the control store does not answer, the source raises
:class:`StoreUnavailable` and the page says so instead of showing stale or partial figures.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

PAGES = ("cluster", "tasks", "objects", "gpu", "serving")
TITLES = {"cluster": "Cluster", "tasks": "Tasks & actors", "objects": "Objects", "gpu": "GPU jobs",
          "serving": "Serving"}
#: The most rows a table shows (the counts above it cover every record).
MAX_ROWS = 200
#: The serving replicas' request latency histogram, as Prometheus names it.
LATENCY_METRIC = "tessera_serving_request_duration_seconds"


class StoreUnavailable(Exception):
    """The control store did not answer (down, restarting, or unreachable from here)."""


class Source(Protocol):
    address: str

    def rows(self, resource: str) -> list[dict[str, Any]]: ...

    def instances(self) -> list[dict[str, Any]]: ...

    def health(self, address: str) -> str: ...

    def gpu_jobs(self) -> list[dict[str, Any]]: ...

    def scrape(self, metrics_address: str) -> str: ...

    def serving_stats(self, address: str) -> dict[str, Any] | None: ...


def trace_id(traceparent: str) -> str:
    """The trace id (32 hex digits) in a W3C ``traceparent`` ("version-traceid-spanid-flags"), or "" when there is
    none."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1].lower()
    return ""


def trace_url(jaeger_ui_url: str, trace_id: str) -> str:
    """Jaeger's page of ``trace_id``, or "" when there is no trace or no Jaeger to link to."""
    return f"{jaeger_ui_url.rstrip('/')}/trace/{trace_id}" if jaeger_ui_url and trace_id else ""


def count_by(rows: Iterable[dict[str, Any]], group: str, state: str = "state") -> list[dict[str, Any]]:
    """Per value of ``group``: how many rows, and how many in each state (most rows first)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = out.setdefault(str(r.get(group) or "(unnamed)"), {"total": 0, "states": {}})
        g["total"] += 1
        g["states"][r[state]] = g["states"].get(r[state], 0) + 1
    return [{"name": k, **v} for k, v in sorted(out.items(), key=lambda kv: (-kv[1]["total"], kv[0]))]


def cluster_page(src: Source) -> dict[str, Any]:
    nodes = src.rows("nodes")
    total: dict[str, float] = {}
    available: dict[str, float] = {}
    for n in nodes:
        if n["state"] == "ALIVE":
            for k, v in n["resources_total"].items():
                total[k] = total.get(k, 0.0) + v
            for k, v in n["resources_available"].items():
                available[k] = available.get(k, 0.0) + v
    services: dict[str, list[dict[str, Any]]] = {}
    for i in src.instances():
        i = {**i, "health": src.health(i["address"]),
             "metrics_url": f"http://{i['metrics_address']}/metrics" if i["metrics_address"] else ""}
        services.setdefault(i["service"], []).append(i)
    return {"nodes": nodes, "alive_nodes": sum(n["state"] == "ALIVE" for n in nodes),
            "resources": [{"name": k, "total": v, "available": available.get(k, 0.0)} for k, v in sorted(total.items())],
            "services": [{"name": k, "replicas": len(v), "serving": sum(i["health"] == "SERVING" for i in v),
                          "instances": sorted(v, key=lambda i: i["address"])} for k, v in sorted(services.items())]}


def throughput(tasks: Iterable[dict[str, Any]], *, bucket_s: int = 1) -> dict[str, list[float]]:
    """Tasks finished and failed per ``bucket_s`` seconds, by when their record last changed (a chart's series)."""
    ends: dict[int, list[int]] = {}
    for t in tasks:
        if t["state"] in ("FINISHED", "FAILED") and t["updated_ms"]:
            b = int(t["updated_ms"] // 1000 // bucket_s * bucket_s)
            ends.setdefault(b, [0, 0])[t["state"] == "FAILED"] += 1
    if not ends:
        return {"t": [], "finished": [], "failed": []}
    xs = list(range(min(ends), max(ends) + 1, bucket_s))
    return {"t": [float(x) for x in xs], "finished": [float(ends.get(x, [0, 0])[0]) for x in xs],
            "failed": [float(ends.get(x, [0, 0])[1]) for x in xs]}


def tasks_page(src: Source, jaeger_ui_url: str = "") -> dict[str, Any]:
    tasks = src.rows("tasks")
    actors = src.rows("actors")
    for t in tasks:  # the trace it ran in, when it was submitted under a span
        t["trace_url"] = trace_url(jaeger_ui_url, t.get("trace_id", ""))
    states: dict[str, int] = {}
    for t in tasks:
        states[t["state"]] = states.get(t["state"], 0) + 1
    actor_states: dict[str, int] = {}
    for a in actors:
        actor_states[a["state"]] = actor_states.get(a["state"], 0) + 1
    failures = [t for t in tasks if t["state"] == "FAILED"]
    dead = [a for a in actors if a["state"] == "DEAD" and a["death_cause"]]
    return {"total": len(tasks), "states": dict(sorted(states.items())), "by_function": count_by(tasks, "name"),
            "tasks": tasks[:MAX_ROWS], "failures": failures[:MAX_ROWS], "actors_total": len(actors),
            "actor_states": dict(sorted(actor_states.items())), "by_class": count_by(actors, "class_name"),
            "actors": actors[:MAX_ROWS], "dead_actors": dead[:MAX_ROWS], "chart": throughput(tasks)}


def objects_page(src: Source) -> dict[str, Any]:
    rows = src.rows("objects")
    unique = {r["object_id"]: r for r in rows}
    by_owner: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["owned"]:
            g = by_owner.setdefault(r["process"], {"objects": 0, "bytes": 0, "job_id": r["job_id"]})
            g["objects"] += 1
            g["bytes"] += r["object_size"] or 0
    by_node: dict[str, dict[str, int]] = {}
    for r in unique.values():
        for node in r["nodes"] or ["(not stored)"]:
            g = by_node.setdefault(node, {"objects": 0, "bytes": 0})
            g["objects"] += 1
            g["bytes"] += r["object_size"] or 0
    spilled = [r for r in unique.values() if r["spilled"]]
    return {"references": len(rows), "objects": len(unique),
            "total_bytes": sum(r["object_size"] or 0 for r in unique.values()),
            "spilled_objects": len(spilled), "spilled_bytes": sum(r["object_size"] or 0 for r in spilled),
            "by_owner": [{"owner": k, **v} for k, v in sorted(by_owner.items(), key=lambda kv: -kv[1]["bytes"])],
            "by_node": [{"node_id": k, **v} for k, v in sorted(by_node.items(), key=lambda kv: -kv[1]["bytes"])],
            "rows": rows[:MAX_ROWS]}


def gpu_page(src: Source, jaeger_ui_url: str = "") -> dict[str, Any]:
    jobs = sorted(src.gpu_jobs(), key=lambda j: j["submitted_at"])
    origin = min((j["submitted_at"] for j in jobs if j["submitted_at"]), default=0.0)
    end = max([j["finished_at"] or j["last_ran_at"] or j["started_at"] or j["submitted_at"] for j in jobs] or [origin])
    if any(h["end"] == 0 for j in jobs for h in j.get("history", ())):  # a time slice still running: up to now
        end = max(end, time.time())
    states: dict[str, int] = {}
    for j in jobs:
        states[j["state"]] = states.get(j["state"], 0) + 1
        j["jct_s"] = j["finished_at"] - j["submitted_at"] if j["finished_at"] and j["submitted_at"] else None
        j["trace_url"] = trace_url(jaeger_ui_url, j.get("trace_id", ""))
    finished = [j for j in jobs if j["jct_s"] is not None]
    jcts = sorted(j["jct_s"] for j in finished)
    chart = {"t": [j["finished_at"] for j in sorted(finished, key=lambda j: j["finished_at"])],
             "jct": [j["jct_s"] for j in sorted(finished, key=lambda j: j["finished_at"])]}
    return {"jobs": jobs, "states": dict(sorted(states.items())), "origin": origin, "span_s": max(end - origin, 1e-9),
            "mean_jct_s": sum(jcts) / len(jcts) if jcts else None,
            "median_jct_s": jcts[len(jcts) // 2] if jcts else None,
            "suspensions": sum(j["suspensions"] for j in jobs), "migrations": sum(j["migrations"] for j in jobs),
            "chart": chart}


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def histogram_buckets(text: str, metric: str, label: str) -> dict[str, dict[float, float]]:
    """The cumulative bucket counts of histogram ``metric`` in a Prometheus exposition, per value of ``label``
    (series differing in other labels are added up)."""
    out: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != f"{metric}_bucket":
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        if "le" not in labels:
            continue
        le = math.inf if labels["le"] == "+Inf" else float(labels["le"])
        series = out.setdefault(labels.get(label, ""), {})
        series[le] = series.get(le, 0.0) + float(m.group(3))
    return out


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated within its bucket (as PromQL's
    ``histogram_quantile``); None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if math.isinf(b):
                return prev_bound  # beyond the last finite bound: the most that can be said
            width = buckets[b] - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / width if width else 1.0)
        prev_bound, prev_count = b, buckets[b]
    return prev_bound


def serving_page(src: Source) -> dict[str, Any]:
    pipelines = src.rows("pipelines")
    replicas = [i for i in src.instances() if i["service"] == "serving"]
    merged: dict[str, dict[float, float]] = {}
    scraped = 0
    for r in replicas:
        text = src.scrape(r["metrics_address"]) if r["metrics_address"] else ""
        scraped += bool(text)
        for name, buckets in histogram_buckets(text, LATENCY_METRIC, "tessera_pipeline").items():
            into = merged.setdefault(name, {})
            for le, n in buckets.items():
                into[le] = into.get(le, 0.0) + n
    for p in pipelines:
        b = merged.get(p["name"], {})
        p["requests"] = int(max(b.values())) if b else 0
        p["p50_ms"] = _ms(quantile(b, 0.5))
        p["p99_ms"] = _ms(quantile(b, 0.99))
    rows = []
    for r in replicas:
        stats = src.serving_stats(r["address"])
        if stats is not None:  # featurizations shared between the pipelines of a batch: work saved
            done = stats["rows_computed"] + stats["rows_reused"]
            stats["reused_share"] = stats["rows_reused"] / done if done else None
        rows.append({"address": r["address"], "http_address": r["http_address"],
                     "metrics_address": r["metrics_address"], "stats": stats})
    return {"pipelines": pipelines, "replicas": rows, "replicas_scraped": scraped}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


BUILDERS: dict[str, Callable[[Source, str], dict[str, Any]]] = {
    "cluster": lambda s, _j: cluster_page(s),
    "tasks": tasks_page,
    "objects": lambda s, _j: objects_page(s),
    "gpu": gpu_page,
    "serving": lambda s, _j: serving_page(s),
}


def page_model(name: str, src: Source, jaeger_ui_url: str = "") -> dict[str, Any]:
    """Page ``name``'s model; with ``store_down`` (the reason) instead of figures when the control store does not
    answer. KeyError for an unknown page (the caller answers 404 naming :data:`PAGES`)."""
    build = BUILDERS[name]
    try:
        return {"page": name, "store_down": "", "store": src.address, **build(src, jaeger_ui_url)}
    except StoreUnavailable as e:
        return {"page": name, "store_down": str(e), "store": src.address}
