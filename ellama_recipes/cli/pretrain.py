"""`ellama pretrain` (being written)."""
