"""Redis adapters: the answer cache, per-key limits and budgets, and the keyspace they share."""
