"""OpenTelemetry tracing and metrics, and JSON logs carrying trace ids.

OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set; tests install an in-memory
exporter through `install_tracing(exporter=...)` and an in-memory metric reader
through `install_metrics(reader=...)` (before any service installs the provider).

Each module makes its own instruments (`metrics.get_meter(__name__)`, names under
`kabinet.`) at import; they measure nothing until a provider is installed.
"""

from __future__ import annotations

import logging
import sys
import uuid

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from pythonjsonlogger.json import JsonFormatter

_installed: TracerProvider | None = None
_meters_installed: MeterProvider | None = None
METRICS_EXPORT_INTERVAL_S = 15  # a scrape-like cadence: gauges read between two sends are lost, counters never
# Replicas of a service send the same series and spans: the instance id keeps them apart, and
# finds the metrics of the process a trace went through.
INSTANCE_ID = str(uuid.uuid4())


def _resource(service_name: str) -> Resource:
    return Resource.create({"service.name": service_name, "service.instance.id": INSTANCE_ID})


def install_tracing(service_name: str, otlp_endpoint: str | None = None, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the process-wide tracer provider once; later calls only add exporters."""
    global _installed
    if _installed is None:
        _installed = TracerProvider(resource=_resource(service_name))
        trace.set_tracer_provider(_installed)
    if exporter is not None:
        _installed.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        _installed.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_endpoint.rstrip('/')}/v1/traces")))
    return _installed


def install_metrics(service_name: str, otlp_endpoint: str | None = None, reader: MetricReader | None = None
                    ) -> MeterProvider:
    """Install the process-wide meter provider once: OpenTelemetry fixes its readers when it is
    made, so a later call changes nothing (a process is one service)."""
    global _meters_installed
    if _meters_installed is None:
        readers = [reader] if reader is not None else []
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=f"{otlp_endpoint.rstrip('/')}/v1/metrics"),
                export_interval_millis=METRICS_EXPORT_INTERVAL_S * 1000))
        _meters_installed = MeterProvider(metric_readers=readers, resource=_resource(service_name))
        metrics.set_meter_provider(_meters_installed)
    return _meters_installed


class TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        record.span_id = format(context.span_id, "016x") if context.is_valid else None
        return True


def install_json_logging(service_name: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            static_fields={"service": service_name},
        )
    )
    handler.addFilter(TraceIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
