"""Benchmarks that live in the project (`streamtune bench ...`, `make bench`)."""
