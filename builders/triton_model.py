"""The ``model.py`` of every genrec model served by Triton's Python backend (copied there by the builder).

A thin adapter: tensors in, ``genrec.builders.handlers`` out, one response per request. Which handler runs
is the config's ``handler`` parameter. Bad input comes back as an error response for that request only; an
unexpected failure fails the batch's requests with INTERNAL naming the model (the traceback goes to the
server log) and leaves the model loaded. A request whose caller has gone (cancelled, deadline passed before
its step started) is answered CANCELLED without being computed.
"""

import json
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from genrec.builders.handlers import Recommender, load_handler
from genrec.builders.limits import Cancelled
from genrec.builders.user_cache import INVALIDATIONS, UserCache
from genrec.client import protocol

# Prometheus histogram buckets: history events per request, candidates per request.
SIZE_BUCKETS = [1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 100_000]
OUTCOMES = ("ok", "invalid_argument", "cancelled", "internal")


class Writer:
    """Metric updates applied by a background thread once the batch's responses are on their way.

    Every update is a round trip from the stub to the server (~30 us each, 4-6 a request): paid in `execute`
    they were ~0.15-0.3 ms of every request's latency (measured at concurrency 1). Queued here they are
    written right after `execute` returns, a batch's counts summed into one update per series; a reader of
    the metrics port sees them a moment after the responses. `close` writes what is left."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._increments: dict[int, tuple[Any, float]] = {}  # by id(metric): (metric, sum)
        self._observations: list[tuple[Any, float]] = []
        self._gauges: dict[int, tuple[Any, float]] = {}  # by id(metric): (metric, latest value)
        self._thread = threading.Thread(target=self._run, name="genrec-metrics", daemon=True)
        self._thread.start()

    def increment(self, metric: Any, by: float) -> None:
        with self._lock:
            _, total = self._increments.get(id(metric), (metric, 0.0))
            self._increments[id(metric)] = metric, total + by

    def observe(self, metric: Any, value: float) -> None:
        with self._lock:
            self._observations.append((metric, value))

    def set(self, metric: Any, value: float) -> None:
        with self._lock:
            self._gauges[id(metric)] = metric, value

    def flush_soon(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._write()
            if self._closing:
                return

    def _write(self) -> None:
        with self._lock:
            increments, observations, gauges = self._increments, self._observations, self._gauges
            self._increments, self._observations, self._gauges = {}, [], {}
        try:
            for metric, total in increments.values():
                metric.increment(total)
            for metric, value in observations:
                metric.observe(value)
            for metric, value in gauges.values():
                metric.set(value)
        except Exception:  # a metric that failed to write must not stop the thread (or any request)
            pb_utils.Logger.log_error(f"genrec metrics: {traceback.format_exc()}")


class Metrics:
    """genrec's own Prometheus series on Triton's metrics port, labelled by model, written by a `Writer`."""

    def __init__(self, model: str, writer: Writer) -> None:
        self.writer = writer
        counter, histogram = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        self._families = [
            requests := pb_utils.MetricFamily("genrec_requests_total", "requests by outcome", counter),
            unknown := pb_utils.MetricFamily("genrec_history_unknown_total", "history ids the model never saw", counter),
            truncated := pb_utils.MetricFamily("genrec_history_truncated_total", "events dropped beyond max_len", counter),
            events := pb_utils.MetricFamily("genrec_history_events", "history events per request", histogram),
            candidates := pb_utils.MetricFamily("genrec_candidates", "candidates per request", histogram),
        ]  # a family must outlive its metrics
        labels = {"model": model}
        self.requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self.unknown, self.truncated = unknown.Metric(labels=labels), truncated.Metric(labels=labels)
        self.events = events.Metric(labels=labels, buckets=SIZE_BUCKETS)
        self.candidates = candidates.Metric(labels=labels, buckets=SIZE_BUCKETS)

    def observe_request(self, request: dict[str, np.ndarray]) -> None:
        if protocol.HISTORY_ITEM_IDS in request:
            self.writer.observe(self.events, float(request[protocol.HISTORY_ITEM_IDS].shape[-1]))
        if protocol.CANDIDATE_ITEM_IDS in request:
            self.writer.observe(self.candidates, float(request[protocol.CANDIDATE_ITEM_IDS].shape[-1]))

    def count(self, outcome: str, requests: int = 1) -> None:
        self.writer.increment(self.requests[outcome], requests)

    def observe_result(self, result: dict[str, np.ndarray]) -> None:
        if protocol.NUM_UNKNOWN in result:
            for metric, name in ((self.unknown, protocol.NUM_UNKNOWN), (self.truncated, protocol.NUM_TRUNCATED)):
                if count := float(result[name].sum()):  # no update for a count that did not move
                    self.writer.increment(metric, count)


class CacheMetrics:
    """genrec_user_cache_* series: Prometheus counters only go up, so each is incremented by what changed; a
    gauge is set when its value changed. Read from the cache in `execute`, written by the `Writer`."""

    COUNTERS = {"hits": "requests whose history extended the cached one", "misses": "named users not cached",
                "events_appended": "events computed on top of a cached history",
                "evictions": "users dropped to stay in the budget", "too_large": "users bigger than the budget"}

    def __init__(self, model: str, writer: Writer) -> None:
        self.writer = writer
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        labels = {"model": model}
        self._families: list = []  # a family must outlive its metrics
        families = self._families
        self.counters = {}
        for name, text in self.COUNTERS.items():
            families.append(family := pb_utils.MetricFamily(f"genrec_user_cache_{name}_total", text, counter))
            self.counters[name] = family.Metric(labels=labels)
        families.append(invalidated := pb_utils.MetricFamily(
            "genrec_user_cache_invalidations_total", "cached users recomputed, by reason", counter))
        self.invalidations = {r: invalidated.Metric(labels={**labels, "reason": r}) for r in INVALIDATIONS}
        families.append(used := pb_utils.MetricFamily("genrec_user_cache_bytes", "bytes held by the user cache", gauge))
        families.append(users := pb_utils.MetricFamily("genrec_user_cache_users", "users held", gauge))
        families.append(budget := pb_utils.MetricFamily("genrec_user_cache_budget_bytes", "the budget", gauge))
        self.bytes, self.users, self.budget = (f.Metric(labels=labels) for f in (used, users, budget))
        self.seen: dict[str, float] = {}

    def observe(self, cache: UserCache) -> None:
        stats = cache.stats
        values = {name: getattr(stats, name) for name in self.COUNTERS}
        values |= {f"invalidated:{r}": stats.invalidations[r] for r in INVALIDATIONS}
        for name, value in values.items():
            delta = value - self.seen.get(name, 0)
            if delta:
                metric = self.invalidations[name.split(":")[1]] if ":" in name else self.counters[name]
                self.writer.increment(metric, float(delta))
            self.seen[name] = value
        gauges = {"bytes": (self.bytes, cache.bytes_in_use), "users": (self.users, len(cache)),
                  "budget": (self.budget, cache.budget_bytes)}
        for name, (gauge, value) in gauges.items():
            if self.seen.get(f"gauge:{name}") != value:
                self.writer.set(gauge, float(value))
                self.seen[f"gauge:{name}"] = value


def _error(message: str, invalid_argument: bool) -> "pb_utils.TritonError":
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.name = f"{args['model_name']} version {args['model_version']}"
        self.handler = load_handler(parameters["handler"], version_dir, parameters)
        self.writer = Writer()
        self.metrics = Metrics(args["model_name"], self.writer)
        self.cache = getattr(self.handler, "cache", None)
        self.cache_metrics = CacheMetrics(args["model_name"], self.writer) if self.cache is not None else None
        if self.cache_metrics is not None:
            self.cache_metrics.observe(self.cache)
        self.writer.flush_soon()

    def finalize(self) -> None:
        self.writer.close()

    def execute(self, requests: list) -> list:
        try:
            return self._execute(requests)
        finally:
            self.writer.flush_soon()

    def _execute(self, requests: list) -> list:
        cancelled = [r.is_cancelled() for r in requests]
        live = [r for r, gone in zip(requests, cancelled, strict=True) if not gone]
        batch = []
        for request in live:
            tensors = (pb_utils.get_input_tensor_by_name(request, name) for name in self.input_names)
            batch.append({t.name(): t.as_numpy() for t in tensors if t is not None})
            self.metrics.observe_request(batch[-1])
        try:
            if isinstance(self.handler, Recommender):  # checks its callers between prefill and candidate chunks
                computed = self.handler.execute(batch, [r.is_cancelled for r in live]) if batch else []
            else:
                computed = self.handler.execute(batch) if batch else []
            results = iter(computed)
        except Exception:  # a bug, not bad input: report it to every caller, keep serving
            pb_utils.Logger.log_error(f"{self.name}: {traceback.format_exc()}")
            error = _error(f"internal error in {self.name} (the server log has the details)", False)
            self.metrics.count("internal", len(requests))
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        for gone in cancelled:
            result = Cancelled("the caller cancelled the request") if gone else next(results)
            if isinstance(result, Cancelled):
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.CANCELLED)
                responses.append(pb_utils.InferenceResponse(error=error))
                self.metrics.count("cancelled")
            elif isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=_error(str(result), True)))
                self.metrics.count("invalid_argument")
            else:
                outputs = [pb_utils.Tensor(name, array) for name, array in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
                self.metrics.count("ok")
                self.metrics.observe_result(result)
        if self.cache_metrics is not None:
            self.cache_metrics.observe(self.cache)
        return responses
