"""The sinks: the downstream systems kept equal to CMDB, the registry that makes them, and the applier that feeds them.

Nothing here speaks to the broker: the bus's consumers (``rwatch.bus.consumer``) or the memory bus hand batches
to an ``Applier``, which applies them to a ``Sink`` (``base``) made by ``registry`` (mirror, webhook, jsonl,
prom_sd) and isolates poison (``isolation``).
"""
