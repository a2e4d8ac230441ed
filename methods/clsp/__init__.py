"""CLSP (synthetic positives from a diffusion model): the add-on (``addon.SyntheticPositives``), the
DDPM and its interpolating sampler (``diffusion``), the synthetic set's generation (``generate``,
also ``python -m methods.clsp.addon.generate``) and its config checks (``SyntheticPositives.check_config``)."""
