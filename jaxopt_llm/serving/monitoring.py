"""Prometheus metrics of a server (its own registry): requests and errors by route and status, latency,
batch sizes, confidences and predicted classes, and the drift statistics of the live window."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from jaxopt_llm.serving.drift import DriftMonitor


class Metrics:
    def __init__(self, labels: list[str], drift: DriftMonitor):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxopt_requests", "HTTP requests", ["route", "status"], registry=r)
        self.errors = Counter("jaxopt_errors", "requests answered with an error", ["route", "status"], registry=r)
        self.aborts = Counter("jaxopt_client_aborts", "requests whose client hung up while sending", ["route"],
                              registry=r)
        self.latency = Histogram("jaxopt_request_latency_seconds", "request latency", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch = Histogram("jaxopt_batch_size", "texts per model call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("jaxopt_batch_seconds", "model call time", registry=r)
        self.confidence = Histogram("jaxopt_confidence", "max class probability", registry=r,
                                    buckets=tuple(np.round(np.linspace(0.1, 1.0, 10), 2)))
        self.predicted = Counter("jaxopt_predicted", "predictions per class", ["label"], registry=r)
        self.drift_stat = Gauge("jaxopt_drift", "drift statistics of the live window vs the reference", ["statistic"],
                                registry=r)
        self.labels, self.drift = labels, drift

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_predictions(self, probs: np.ndarray, cls: np.ndarray) -> None:
        for p in probs.max(-1):
            self.confidence.observe(float(p))
        for c in probs.argmax(-1):
            self.predicted.labels(self.labels[int(c)]).inc()
        self.drift.add(probs, cls)

    def render(self) -> bytes:
        for name, value in self.drift.report().items():
            self.drift_stat.labels(name).set(value)
        return generate_latest(self.registry)
