"""Exact deduplication of conversations by a hash of their normalised messages (method §5).

Normalisation: Unicode NFC, leading/trailing whitespace stripped, every whitespace run collapsed to one space.
Case, punctuation and roles are kept: "Hello" and "hello" are different rows.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter

from flare.data.conversation import Conversation


def normalise_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def conversation_digest(conversation: Conversation) -> bytes:
    """sha256 over (role, normalised content, normalised reasoning) of every message."""
    key = [(m.role, normalise_text(m.content), None if m.reasoning is None else normalise_text(m.reasoning))
           for m in conversation.messages]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False).encode("utf-8")).digest()


class Deduplicator:
    """Remembers the digests seen so far (32 bytes per distinct row); counts duplicates in ``stats``."""

    def __init__(self, stats: Counter | None = None) -> None:
        self.seen: set[bytes] = set()
        self.stats = stats if stats is not None else Counter()

    def is_duplicate(self, conversation: Conversation) -> bool:
        """True when an equal (normalised) conversation was seen before; the first copy is kept."""
        digest = conversation_digest(conversation)
        if digest in self.seen:
            self.stats["duplicate"] += 1
            return True
        self.seen.add(digest)
        return False
