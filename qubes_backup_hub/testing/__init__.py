"""Test helpers any qbhub plugin distribution can use (imported only by tests)."""
