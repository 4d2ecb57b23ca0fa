"""Placeholder until scheduler.tiers lands."""
