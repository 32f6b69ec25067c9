"""When the standard OTEL_* variables turn traces on, and what the gateway refuses."""

from __future__ import annotations

import pytest

from gateway.trace_settings import TraceExport, TraceSettingsError, safe_endpoint, trace_export


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": " TRUE "},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "   "},
    ],
)
def test_off(environ: dict[str, str]) -> None:
    assert trace_export(environ) is None


def test_on_by_endpoint_with_the_spec_default_protocol() -> None:
    assert trace_export({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == TraceExport(
        "http/protobuf", "http://c:4318"
    )


def test_traces_variables_win_over_the_general_ones() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
    }
    assert trace_export(environ) == TraceExport("grpc", "http://traces:4317")


def test_exporter_otlp_alone_turns_traces_on_at_the_default_endpoint() -> None:
    export = trace_export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert export == TraceExport("grpc", "")
    assert export.describe() == "OTLP grpc to the default endpoint"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp,zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "x"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_unsupported_values_name_their_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(TraceSettingsError, match=named):
        trace_export(environ)


def test_the_logged_endpoint_holds_no_credential() -> None:
    shown = safe_endpoint("https://user:s3cret@collector.example:4318/otlp?token=abc#f")
    assert shown == "https://collector.example:4318/otlp"
    assert safe_endpoint("http://[::1]:4317") == "http://[::1]:4317"
    described = TraceExport("grpc", "https://k:s3cret@c:4317?api_key=abc").describe()
    assert "s3cret" not in described and "abc" not in described
