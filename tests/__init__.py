"""ragcache test suite."""
