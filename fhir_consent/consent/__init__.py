"""Package placeholder; filled in by later commits."""
