"""System tests: several processes, faults, the browser, the compose files."""
