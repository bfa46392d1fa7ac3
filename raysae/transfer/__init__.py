"""The layer-transfer study: its grid (scratch, zero-shot, forward/backward transfer, the compute
plan) and its scores (normalized CES, MMCS, transfer scores)."""
