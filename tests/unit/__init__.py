"""Unit tests: pure logic, no servers and no network (run alone with `make test-unit`)."""
