"""Order books, bars and order-flow indicators (FEATURES.md)."""
