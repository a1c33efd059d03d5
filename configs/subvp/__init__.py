"""Per-model configs; each module defines get_config()."""
