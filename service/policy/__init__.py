"""Pure decision logic with no I/O: guardrails, routing, prompt assembly, semantic matching, token counts."""
