"""Made-up document text for ingest tests."""

from __future__ import annotations


def paragraphs(topic: str, n: int) -> str:
    return "\n\n".join(
        f"Paragraph {i} about {topic}. It explains one detail of {topic} in a full sentence. "
        f"A second sentence adds a number, {i * 7}, so chunks differ."
        for i in range(n)
    )
