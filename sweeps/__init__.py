"""Training engine, sweeps, scaling-law fits and reports."""
