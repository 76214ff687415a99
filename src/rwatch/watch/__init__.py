"""Following CMDB: the watcher and its rooms (lease, batches, delivery, gaps), resync, verify and the guard."""
