"""One readable recipe per method, built from the shared pieces in ``workers``."""
