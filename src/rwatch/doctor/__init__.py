"""``rwatch doctor``'s checks: one run against a real CMDB before ``rwatch run``, a verdict and a fix per line."""
