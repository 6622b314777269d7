"""Storage tiers. Each owns its own state; only the manager knows several."""
