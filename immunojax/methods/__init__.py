"""The four immunization methods, built on the core (never the reverse)."""
