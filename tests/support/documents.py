"""Made-up document text for ingest tests."""

from __future__ import annotations

from pathlib import Path


def paragraphs(topic: str, n: int) -> str:
    return "\n\n".join(
        f"Paragraph {i} about {topic}. It explains one detail of {topic} in a full sentence. "
        f"A second sentence adds a number, {i * 7}, so chunks differ."
        for i in range(n)
    )


def write_pages(folder: Path, pages: dict[str, str]) -> Path:
    """`folder`, created, holding one file per page (name → text)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in pages.items():
        (folder / name).write_text(text)
    return folder
