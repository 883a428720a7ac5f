"""`ellama plan` (being written)."""
