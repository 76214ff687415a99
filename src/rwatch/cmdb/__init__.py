"""The CMDB side: the HTTP client, the resource_watch wire protocol, and the list APIs a resync pages through."""
