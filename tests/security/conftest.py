"""Fixtures for the security suite: the relay tests' loopback peers, reused as they are."""
