"""Resume from the newest complete checkpoint; skip partial or corrupt ones with a message."""

from __future__ import annotations

from nemo import lightning as nl


class SafeAutoResume(nl.AutoResume):
    """``nl.AutoResume`` that never picks a half-written checkpoint."""
