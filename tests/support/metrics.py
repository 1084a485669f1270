"""What the services under test measured: the process's meter provider reads into memory.

Installed as the session starts, before any service installs its own (a process has one
meter provider: telemetry.install_metrics). Values are cumulative over the session, so a
test compares them before and after what it does."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from kabinet_chassis import telemetry

READER = InMemoryMetricReader()


def pytest_configure(config: pytest.Config) -> None:
    telemetry.install_metrics("kabinet-tests", reader=READER)


class Measured:
    """The latest reading of the process's instruments."""

    def __init__(self) -> None:
        self.points: dict[str, list] = {}
        data = READER.get_metrics_data()  # None before anything was measured
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self.points.setdefault(metric.name, []).extend(metric.data.data_points)

    def value(self, name: str, **attributes: str) -> int | float:
        """A counter's total or a gauge's last value with exactly these attributes (0 if none yet)."""
        return next((point.value for point in self.points.get(name, ()) if dict(point.attributes) == attributes), 0)

    def histogram(self, name: str, **attributes: str) -> HistogramDataPoint | None:
        return next((point for point in self.points.get(name, ()) if dict(point.attributes) == attributes), None)

    def names(self) -> set[str]:
        return set(self.points)


@pytest.fixture
def measured():
    """Call it for the latest reading: `before = measured()`, act, `after = measured()`."""
    return Measured
