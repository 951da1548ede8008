"""What several stage modules share: the oldest-first ranker."""

from __future__ import annotations

from hopflow.registry import Ranker

BY_ID = Ranker("id", "oldest input first", expression=lambda c: c.item_id)
