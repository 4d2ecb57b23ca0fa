"""Placeholder: the bandwidth-aware and reference priority policies are registered here."""
