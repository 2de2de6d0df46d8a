"""Scaling-law analysis, in import order: solver (robust power-sum fits, bootstrap, intervals) -> status (what a
fit may claim) -> laws (frontier, L(C), L(N, D), multipliers) -> approaches (IsoFLOP, envelope, leave-one-out)
-> rows (the database reader) and group (points, per-group analysis) -> recall, tables, plots -> report."""
