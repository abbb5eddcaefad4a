"""Triton kernels, launchers and op registrations, one module per family."""
