"""Whole runs and their data as functions: toy recipes for the CPU demo, configs for real-size conversions."""
