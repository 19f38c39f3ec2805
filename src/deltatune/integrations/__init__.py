"""Integrations with other libraries (loaded lazily; the core imports none of them)."""
