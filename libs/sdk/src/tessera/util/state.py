"""Cluster state, as Ray's state API (``ray.util.state``): list and summarise what the control store holds.

    from tessera.util.state import list_tasks, summarize_tasks
    list_tasks(filters=[("state", "=", "RUNNING")], limit=20)

The implementation lives in :mod:`tessera._state`, which the command line (``tessera list``) imports
without loading the rest of the SDK.
"""

from __future__ import annotations

from tessera._state import (
    COLUMNS,
    RESOURCES,
    get_log,
    list_actors,
    list_jobs,
    list_nodes,
    list_objects,
    list_pipelines,
    list_placement_groups,
    list_state,
    list_tasks,
    summarize_actors,
    summarize_objects,
    summarize_tasks,
)

__all__ = ["COLUMNS", "RESOURCES", "get_log", "list_actors", "list_jobs", "list_nodes", "list_objects", "list_pipelines",
           "list_placement_groups", "list_state", "list_tasks", "summarize_actors", "summarize_objects",
           "summarize_tasks"]
