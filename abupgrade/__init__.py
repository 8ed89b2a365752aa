"""abupgrade: atomic A/B OS upgrades and rollback."""

__version__ = "0.1.0"
