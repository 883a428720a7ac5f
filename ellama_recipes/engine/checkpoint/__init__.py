"""Engine checkpoints, split by job: read (chunk by chunk), write (weights + context), verify (bit-exact, independent
of the conversion), hf_import / hf_export (the streamed conversions), parity (the engine's own forward pass)."""
