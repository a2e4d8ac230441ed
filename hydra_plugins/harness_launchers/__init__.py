"""The harness's Hydra launchers (see launchers.py); Hydra only loads plugins from hydra_plugins.*."""
