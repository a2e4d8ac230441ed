"""The job runner: the Hydra app's config (validation, run keys), one run end to end, sweeps and tuning."""
