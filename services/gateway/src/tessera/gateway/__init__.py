"""Tessera gateway: one published address through which a driver outside the cluster's network
(the host of a compose stack, a laptop) reaches every service replica.

gRPC calls carry the address of the replica they are meant for in the ``tessera-route`` header
(the SDK adds it when it finds a gateway at the address it was given); the gateway forwards them
as bytes, streams included, to that replica if the control store lists it. A second port relays
HTTP connections to serving replicas' HTTP front ends.
"""
