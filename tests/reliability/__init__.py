"""Reliability tests: malformed input, failures and recovery, checked through the real CLI."""
