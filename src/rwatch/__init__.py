"""rwatch: follows BlueKing CMDB's resource_watch API and keeps downstream systems in step with it."""

__version__ = "0.1.0"
