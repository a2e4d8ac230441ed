"""The harness's Optuna sweeper for Hydra (optuna_sweeper.py); Hydra only loads plugins from hydra_plugins.*."""
