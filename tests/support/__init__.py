"""The kit tests and benchmarks share: the provider wire-protocol server, the SSE parser, settings, servers.

The service never imports it.
"""
