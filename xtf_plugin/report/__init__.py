"""Explaining a selection: summary statistics (and, later, the HTML report and token exports)."""
