"""Compatibility: the report moved to the package ``semisparse.report``; this name keeps older imports working."""

from semisparse.report import (  # noqa: F401
    PROTOCOL_FIELDS,
    TRAIN_PLOTS,
    RunInfo,
    compressed_bytes_estimate,
    read_run,
    write_report,
)

__all__ = ["PROTOCOL_FIELDS", "TRAIN_PLOTS", "RunInfo", "compressed_bytes_estimate", "read_run", "write_report"]
