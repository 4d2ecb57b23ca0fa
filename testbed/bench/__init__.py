"""Benchmarks, soak and fault injection for the object tier: each module is a script that prints and saves
JSON under ``results/bench/`` with its command, machine and date."""
