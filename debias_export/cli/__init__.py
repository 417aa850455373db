"""Command-line interface (``debias-export``)."""
