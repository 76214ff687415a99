"""Prometheus metrics. Names start with ``rwatch_``, use base units, and no label takes per-object values."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from rwatch import progress

WATCH_REQUESTS = Counter(
    "rwatch_watch_requests_total",
    "resource_watch calls by outcome (events, empty, cursor_expired, start_out_of_window, malformed, transient, "
    "rate_limited, refused, permanent)",
    ["resource", "outcome"],
)
WATCH_REQUEST_SECONDS = Histogram(
    "rwatch_watch_request_duration_seconds",
    "Time a resource_watch call took, long-poll hold included",
    ["resource"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 25, 30, 40),
)
WATCH_BACKOFFS = Counter(
    "rwatch_watch_backoffs_total", "Pauses before retrying a failed watch call", ["resource", "reason"]
)
EVENTS_RECEIVED = Counter(
    "rwatch_events_received_total", "Events received from CMDB", ["resource", "action"]
)
EVENTS_PUBLISHED = Counter(
    "rwatch_events_published_total", "Events confirmed durable by the bus", ["resource", "action"]
)
EVENTS_INVALID = Counter(
    "rwatch_events_invalid_total",
    "Events CMDB sent that rwatch could not normalize (skipped, logged)",
    ["resource", "reason"],
)
CURSOR_DECODE_FAILURES = Counter(
    "rwatch_cursor_decode_failures_total",
    "Cursors that did not decode; the event's version fell back to the receive time",
    ["resource"],
)
CURSOR_SAVES = Counter("rwatch_cursor_saves_total", "Cursors saved to the store", ["resource"])
CURSOR_EXPIRED = Counter(
    "rwatch_cursor_expired_total", "Cursor losses (1103007 / 1199006) handled by resuming by time", ["resource"]
)
CURSOR_GAPS = Counter("rwatch_cursor_gaps_total", "Intervals of history lost and recorded as gaps", ["resource"])
CURSOR_GAP_SECONDS = Counter(
    "rwatch_cursor_gap_seconds_total", "Length of the recorded gaps", ["resource"]
)
LAST_POLL = Gauge(
    "rwatch_watch_last_success_timestamp_seconds", "When the last watch call succeeded", ["resource"]
)
PUBLISH_SECONDS = Histogram(
    "rwatch_publish_duration_seconds",
    "Time from handing a batch to the bus until every event in it was confirmed",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PUBLISH_RETRIES = Counter(
    "rwatch_publish_retries_total", "Publishes retried after a nack, return, timeout or lost connection",
    ["reason"],
)
LEASE_HELD = Gauge("rwatch_lease_held", "1 while this process holds the resource's HA lease", ["resource"])
LEASE_LOSSES = Counter("rwatch_lease_losses_total", "HA leases lost while following (taken_over, not_renewed, "
                       "fence_refused)", ["resource", "reason"])
CMDB_REFUSALS = Counter(
    "rwatch_cmdb_refusals_total",
    "Requests CMDB or its gateway refused for who was asking (reason: auth, grant, tenant, permission, not_found); "
    "retried every cmdb.refusal_retry",
    ["resource", "reason"],
)
HIDDEN_BUSINESSES = Gauge(
    "rwatch_cmdb_hidden_businesses",
    "Businesses the biz stream showed alive that search_business did not list at the last check (hidden from "
    "the configured user by IAM, or deleted while history was lost); nothing of them is deleted downstream",
)
RESYNCS = Counter("rwatch_resyncs_total", "Resyncs by trigger (bootstrap, gap, periodic, manual, repair) and "
                  "outcome (ok, incomplete, held, failed, stopped, unsupported)", ["resource", "trigger", "outcome"])
SWEEP_HELD = Gauge("rwatch_sweep_held_objects", "Objects the last resync's sweep would have deleted when the "
                   "mass-delete guard held it (0: not held); released by rwatch resync --allow-mass-delete",
                   ["resource"])
RESYNC_SECONDS = Histogram("rwatch_resync_seconds", "Duration of successful resyncs", ["resource"],
                           buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
RESYNC_OBJECTS = Counter("rwatch_resync_objects_total", "Objects published by resyncs", ["resource"])
RESYNC_REQUESTS = Counter("rwatch_resync_list_requests_total", "List API requests made by resyncs", ["api"])
RESYNC_SWEPT = Counter("rwatch_resync_swept_total", "Objects a sink ended as deleted because a resync's "
                       "snapshot no longer had them", ["sink", "resource"])
GAPS_OPEN = Gauge("rwatch_cursor_gaps_open", "Recorded gaps of history not yet filled by a resync", ["resource"])
GAPS_FILLED = Counter("rwatch_cursor_gaps_filled_total", "Gaps of history filled by a resync", ["resource"])
VERIFY_DRIFT = Gauge("rwatch_verify_drift_objects", "Objects that differed between the mirror and CMDB at the "
                     "last verify (missing, extra or changed)", ["sink", "resource"])
VERIFY_LAST_RUN = Gauge("rwatch_verify_last_run_timestamp_seconds", "When the last verify finished", ["sink"])
BUS_CONNECTED = Gauge("rwatch_bus_connected", "1 while the bus is connected and its topology declared")
BUS_RECONNECTS = Counter("rwatch_bus_reconnects_total", "Connections to the broker re-established")
TASK_CRASHES = Counter(
    "rwatch_task_crashes_total", "Supervised tasks that died of an unexpected error and were restarted", ["task"]
)
EVENTS_APPLIED = Counter(
    "rwatch_events_applied_total", "Events a sink applied (or found already applied)", ["sink", "resource", "action"]
)
APPLY_SECONDS = Histogram(
    "rwatch_apply_duration_seconds", "Time a sink took to apply one batch, retries included", ["sink"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
APPLY_RETRIES = Counter("rwatch_apply_retries_total", "Batches retried after a transient sink failure", ["sink"])
DEAD_LETTERS = Counter(
    "rwatch_dead_letters_total", "Events a sink refused for good or that failed alone as poison, moved to its "
    "dead-letter queue", ["sink", "resource"]
)
APPLY_ISOLATIONS = Counter(
    "rwatch_apply_isolations_total",
    "Batches that failed up to their sink's bound and were bisected, by outcome (poison: an event that fails "
    "alone was dead-lettered; applied: all of it applied; held: nothing proved the sink up, the batch is held)",
    ["sink", "resource", "outcome"],
)
POISON_EVENTS = Counter(
    "rwatch_poison_events_total",
    "Events dead-lettered because they failed alone while the sink applied others (also in rwatch_dead_letters_total)",
    ["sink", "resource"],
)
APPLY_CRASHES = Counter(
    "rwatch_apply_crashes_total",
    "Messages whose apply raised an unexpected exception (a bug), each crash counted; rejected so that the "
    "broker's delivery limit counts them",
    ["sink", "resource"],
)
CONSUMER_CONNECTED = Gauge("rwatch_consumer_connected", "1 while the consumers' broker connection is up")
PROM_SD_TARGETS = Gauge(
    "rwatch_prom_sd_targets", "Target groups (one per job and host) in the last rendered service discovery", ["sink"]
)
PROM_SD_RENDERS = Counter(
    "rwatch_prom_sd_renders_total", "Service discovery renders attempted (failures included)", ["sink"]
)
PROM_SD_RENDER_ERRORS = Counter(
    "rwatch_prom_sd_render_errors_total",
    "Service discovery renders that failed (topology unreadable or file not written); retried",
    ["sink"],
)
ZABBIX_RECONCILES = Counter(
    "rwatch_zabbix_reconciles_total", "Zabbix reconciles attempted (failures included)", ["sink"]
)
ZABBIX_ERRORS = Counter(
    "rwatch_zabbix_errors_total", "Zabbix reconciles that failed (Zabbix unreachable or refusing); retried", ["sink"]
)
ZABBIX_API_CALLS = Counter("rwatch_zabbix_api_calls_total", "Zabbix API calls made", ["sink", "kind"])
ZABBIX_HOSTS = Gauge("rwatch_zabbix_hosts", "Hosts the last reconcile kept in Zabbix", ["sink"])
ZABBIX_HELD = Gauge(
    "rwatch_zabbix_held_hosts",
    "Hosts the last reconcile left as they are: unplaced (no module yet) or unproven (gone from the mirror without "
    "a tombstone)",
    ["sink", "reason"],
)
ZABBIX_LAG = Histogram(
    "rwatch_zabbix_lag_seconds", "From a mirror commit to the reconcile that carried it to Zabbix", ["sink"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
ANSIBLE_INVENTORY_HOSTS = Gauge(
    "rwatch_ansible_inventory_hosts", "Hosts in the last rendered Ansible inventory", ["sink"]
)
ANSIBLE_INVENTORY_RENDERS = Counter(
    "rwatch_ansible_inventory_renders_total", "Ansible inventory renders attempted (failures included)", ["sink"]
)
ANSIBLE_INVENTORY_RENDER_ERRORS = Counter(
    "rwatch_ansible_inventory_render_errors_total",
    "Ansible inventory renders that failed (mirror unreadable or file not written); retried",
    ["sink"],
)
WEBHOOK_REQUESTS = Counter(
    "rwatch_webhook_requests_total",
    "Webhook POSTs by outcome (delivered, rejected, failed, timeout, connection_error)",
    ["sink", "outcome"],
)
WEBHOOK_REQUEST_SECONDS = Histogram(
    "rwatch_webhook_request_duration_seconds", "Time one webhook POST took, answer included", ["sink"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WEBHOOK_SKIPPED = Counter(
    "rwatch_webhook_skipped_total",
    "Events not sent again because this process already delivered them (batch retries, redeliveries)",
    ["sink"],
)
JSONL_WRITTEN_BYTES = Counter("rwatch_jsonl_written_bytes_total", "Bytes appended and fsynced by jsonl sinks", ["sink"])
JSONL_ROTATIONS = Counter("rwatch_jsonl_rotations_total", "Files rotated by jsonl sinks at max_bytes", ["sink"])
QUEUE_DEPTH = Gauge(
    "rwatch_queue_depth",
    "Messages ready in a sink's queue (<prefix>.<sink>.<resource>) at the last read by /status or its refresher",
    ["sink", "resource"],
)


class WatchCollector:
    """Lag, cursor age and the retention alarm of the resources this process follows (leaseholders only), read
    from what the watchers publish in ``rwatch.progress`` when scraped, so they keep growing while one is stuck."""

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily("rwatch_watch_lag_seconds",
                                "Seconds since the watcher last knew it was at the head of the stream",
                                labels=["resource"])
        age = GaugeMetricFamily("rwatch_cursor_age_seconds", "Seconds since the saved cursor's event",
                                labels=["resource"])
        alarm = GaugeMetricFamily("rwatch_retention_alarm",
                                  "1 once lag passed two thirds of watch.retention", labels=["resource"])
        refused = GaugeMetricFamily("rwatch_cmdb_refused",
                                    "1 while CMDB refuses the watcher (credentials, gateway grant, tenant, IAM "
                                    "permission, base URL); the log line cmdb_refused names the fix",
                                    labels=["resource"])
        for h in progress.healths():
            lag.add_metric([h.resource], h.lag)
            if h.cursor_age is not None:
                age.add_metric([h.resource], h.cursor_age)
            alarm.add_metric([h.resource], 1.0 if h.retention_alarm else 0.0)
            refused.add_metric([h.resource], 1.0 if h.refused else 0.0)
        yield from (lag, age, alarm, refused)

    def describe(self) -> Iterator[Metric]:
        return iter(())


REGISTRY.register(WatchCollector())
