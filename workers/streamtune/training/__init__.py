"""Bootstrap (offline) training of version-1 adapters on the shipped sample data."""
