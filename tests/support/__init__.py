"""What tests and benchmarks share, in one place: the real CLI and servers (helpers), the fault lab
(faults, service_faults), final-state comparison (final_state) and a plugin stage kind (kinds).
Benchmarks import from here, never from a test module."""
