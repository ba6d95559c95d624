"""Tessera control store: the Global Control Store of the cluster.

Tables of nodes, jobs, functions, tasks (with lineage), objects, actors,
service instances and a namespaced key-value store, kept in sharded Redis
(AOF on), announced on NATS (``tessera.events.<table>.<op>``) and served over
gRPC (``tessera.control_store.v1.ControlStoreService``). The process itself keeps
no state: kill it and start it again, and nothing is lost.
"""
