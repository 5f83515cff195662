"""Model-family adapters: each reads one library's native modules (never re-implements them)."""
