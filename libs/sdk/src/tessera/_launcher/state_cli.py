"""``tessera list`` and ``tessera summary``: the cluster's state from the command line (as ``ray list``).

    tessera list nodes|tasks|actors|objects|jobs|pipelines|placement-groups [--filter KEY=VALUE|KEY!=VALUE]... [--limit N] [--json]
    tessera summary tasks|actors|objects [--json]

Both read a running cluster (this machine's `tessera up`, TESSERA_ADDRESS, or --address) through
:mod:`tessera.util.state`. A bad query (an unknown resource, filter key or predicate) exits 2 naming the
valid choices, before anything is read; a cluster that cannot be reached exits 1 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

EXIT_BAD_INPUT, EXIT_UNREACHABLE = 2, 1

#: The columns the table shows per resource (--json gives every key).
TABLE: dict[str, tuple[str, ...]] = {
    "nodes": ("node_id", "state", "address", "resources_total"),
    "tasks": ("task_id", "name", "state", "type", "node_id", "attempt_number", "error"),
    "actors": ("actor_id", "class_name", "state", "name", "node_id", "restarts"),
    "objects": ("object_id", "object_size", "reference_type", "refs", "process", "nodes"),
    "jobs": ("job_id", "state", "entrypoint", "start_ms"),
    "pipelines": ("name", "operators", "latency_budget_ms"),
    "placement-groups": ("placement_group_id", "name", "strategy", "state", "bundles_to_node_id"),
}
SUMMARIES = ("tasks", "actors", "objects")


def parse_filter(text: str) -> tuple[str, str, str]:
    """``key=value`` or ``key!=value``."""
    if "!=" in text:
        key, _, value = text.partition("!=")
        pred = "!="
    elif "=" in text:
        key, _, value = text.partition("=")
        pred = "="
    else:
        raise ValueError(f"a filter is KEY=VALUE or KEY!=VALUE, got {text!r}")
    return key.strip(), pred, value.strip()


def _cell(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ",".join(str(v)[:8] for v in value) or "-"
    if key.endswith("_ms") and isinstance(value, int) and value:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value / 1000))
    if key.endswith("_id") and isinstance(value, str):
        return value[:16] or "-"
    if value is None or value == "":
        return "-"
    return str(value).replace("\n", " ")[:60]


def table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[_cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tessera._state import DEFAULT_LIMIT, RESOURCES

    ls = sub.add_parser("list", help="list the cluster's nodes, tasks, actors, objects, jobs, pipelines or placement groups")
    ls.add_argument("resource", choices=RESOURCES)
    ls.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="keep records whose KEY equals (KEY=VALUE) or differs from (KEY!=VALUE) VALUE; repeatable")
    ls.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--address", default=None, help="a cluster's control store or gateway (default: this machine's)")
    sm = sub.add_parser("summary", help="tasks per function, actors per class, objects per reference type")
    sm.add_argument("resource", choices=SUMMARIES)
    sm.add_argument("--json", action="store_true")
    sm.add_argument("--address", default=None, help="a cluster's control store or gateway (default: this machine's)")


def _unreachable(cmd: str, address: str | None, e: Exception) -> int:
    from tessera.client._discovery import ClusterNotFoundError

    if isinstance(e, ClusterNotFoundError):
        print(f"tessera {cmd}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    code = getattr(e, "code", None)
    what = f"{code().name}: {e.details()}" if callable(code) else str(e)  # type: ignore[attr-defined]
    print(f"tessera {cmd}: cannot read the cluster at {address or 'this machine'}: {what}", file=sys.stderr)
    return EXIT_UNREACHABLE


def cmd_list(args: argparse.Namespace) -> int:
    from tessera import _state as state

    try:
        filters = [parse_filter(f) for f in args.filter]
        state.check_query(args.resource, filters, args.limit)
    except ValueError as e:
        print(f"tessera list: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        rows, truncated = state.list_state(args.resource, address=args.address, filters=filters, limit=args.limit)
    except ValueError as e:  # a value the query cannot use (a task state that does not exist)
        print(f"tessera list: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        return _unreachable("list", args.address, e)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, TABLE[args.resource]))
    if truncated:
        print(f"(more than {args.limit} {args.resource} matched: showing {len(rows)}; raise --limit to see more)",
              file=sys.stderr)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from tessera import _state as state

    fn = {"tasks": state.summarize_tasks, "actors": state.summarize_actors, "objects": state.summarize_objects}
    try:
        report = fn[args.resource](address=args.address)
    except Exception as e:
        return _unreachable("summary", args.address, e)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.resource == "objects":
        rows = [{"reference_type": k, **v} for k, v in report["summary"].items()]
        print(f"{report['total']} objects, {report['total_size']} bytes")
        print(table(rows, ("reference_type", "objects", "references", "total_size")))
        return 0
    key = "function" if args.resource == "tasks" else "class_name"
    rows = [{key: k, "total": v["total"],
             "states": ", ".join(f"{s}: {n}" for s, n in sorted(v["state_counts"].items()))}
            for k, v in report["summary"].items()]
    print(f"{report['total']} {args.resource}" + (" (the newest; more exist)" if report["truncated"] else ""))
    print(table(rows, (key, "total", "states")))
    return 0
