"""Benchmarks: component benches, the end-to-end load generator and the report writer."""
