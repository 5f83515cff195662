"""Readers that turn files into model inputs (images now; datasets later)."""
