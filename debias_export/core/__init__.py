"""Lowest layer: errors, site names, file I/O, module swaps, choice lists, model records. Imports nothing else of the package."""
