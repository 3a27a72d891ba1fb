"""Benchmarks the workbench builds for itself (organisms it trains, then scores an analysis on)."""
