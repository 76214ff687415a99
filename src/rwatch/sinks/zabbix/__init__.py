"""The Zabbix sink's core: the API client, the desired state computed from the mirror's topology, the reconcile."""
