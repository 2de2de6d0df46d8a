"""Hydra sweeper plugin of the lab: IsoFLOP grids (see sweeps.sweeper and docs/sweeps.md)."""
