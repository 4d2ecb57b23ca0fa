"""ObjectCache's SimPy model: fluid-flow links driven by the scheduler core, GPU layer compute from a measured
profile, the storage paths (recompute, local DRAM, plain S3, ObjectCache gather), tiers, workloads and the
experiments.  ``python -m sim`` runs the headline experiments (see ``configs/``)."""
