"""
The workers' metrics and status, as one: what the main process's admin
endpoint answers with C{--workers N} (L{tcpproxy.supervisor}).

Pure functions on what each worker answered (its C{/metrics} text, its
C{/status} document): the main process relays nothing and counts nothing
of its own but its workers.

  - A counter, a histogram and most gauges are summed over the workers:
    clients accepted, open connections, bytes, connect errors, durations,
    the CPU seconds and memory of the processes.
  - A few gauges are not amounts, and summing them would be wrong
    (L{NOT_SUMMED}): whether a target is in rotation is the lowest over
    the workers (health is checked by each worker on its own, so a target
    one worker found down is reported down); a time is the latest (or for
    a start time the earliest); the descriptor limit the lowest.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families

NOT_SUMMED = {
    "tcpproxy_target_up": min,
    "process_start_time_seconds": min,
    "process_max_fds": min,
}
"""
Family name to how its samples combine over the workers; every other
family is summed.
"""

LEFT_OUT = ("tcpproxy_reloads", "tcpproxy_config_last_reload_success_timestamp_seconds")
"""
Families the main process gives of its own: a reload is one event for the
whole proxy, checked once by the main process, not one per worker.
"""


def sumMetrics(texts: Iterable[bytes]) -> list[Metric]:
    """
    The workers' metrics as one set of families (in the order they first
    appear), samples combined as the module says.

    @param texts: each worker's C{/metrics} page (Prometheus' text format).
    """
    families: dict[str, Metric] = {}
    samples: dict[str, dict[tuple, list[float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            if family.name in LEFT_OUT:
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                samples[family.name] = {}
            rows = samples[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                rows.setdefault(key, []).append(sample.value)
    result = []
    for name, metric in families.items():
        combine = NOT_SUMMED.get(name, sum)
        for (sampleName, labels), values in samples[name].items():
            metric.add_sample(sampleName, dict(labels), combine(values))
        result.append(metric)
    return result


_STATE_ORDER = ("down", "draining", "up")


def mergeStatus(statuses: Sequence[dict]) -> list[dict]:
    """
    The C{apps} of the workers' C{/status} documents as one: counts summed
    over the workers, a target's state the worst any worker gives it
    (C{down}, then C{draining}, then C{up}), its last error the latest.

    @param statuses: each worker's C{/status} (L{tcpproxy.admin.statusOf}),
        all of the same configuration but for the limits, which are each
        worker's share: the first document's limits are replaced by the
        sums.
    @return: the C{apps} list, in the first document's order.
    """
    if not statuses:
        return []
    apps = copy.deepcopy(statuses[0]["apps"])
    byName = {app["name"]: app for app in apps}
    for status in statuses[1:]:
        for app in status["apps"]:
            merged = byName.get(app["name"])
            if merged is None:
                continue  # a worker between two configurations
            connections = merged["connections"]
            connections["active"] += app["connections"]["active"]
            connections["total"] += app["connections"]["total"]
            for reason, count in app["connections"]["refused"].items():
                connections["refused"][reason] = connections["refused"].get(reason, 0) + count
            merged["bytesReceived"] += app["bytesReceived"]
            merged["bytesSent"] += app["bytesSent"]
            if merged["limits"]["maxConnections"] is not None and app["limits"]["maxConnections"] is not None:
                merged["limits"]["maxConnections"] += app["limits"]["maxConnections"]
            targets = {t["target"]: t for t in merged["targets"]}
            for target in app["targets"]:
                into = targets.get(target["target"])
                if into is None:
                    continue
                into["active"] += target["active"]
                into["pooled"] += target["pooled"]
                into["connections"] += target["connections"]
                for kind, count in target["errors"].items():
                    into["errors"][kind] = into["errors"].get(kind, 0) + count
                if _STATE_ORDER.index(target["state"]) < _STATE_ORDER.index(into["state"]):
                    into["state"] = target["state"]
                last, mine = into["lastError"], target["lastError"]
                if mine is not None and (last is None or mine["at"] > last["at"]):
                    into["lastError"] = mine
    return apps
