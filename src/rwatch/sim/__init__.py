"""The CMDB simulator (``rwatch sim``): the watch protocol, the list APIs, the gateway and ESB, faults, load."""
