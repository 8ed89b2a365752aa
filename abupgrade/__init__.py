"""abupgrade: atomic A/B OS upgrades and rollback."""
