"""Logs, tracing, Prometheus metrics and the dashboard's time series."""
