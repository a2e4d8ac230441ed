"""SSL methods: one small file each (heads + loss), found through ``method._target_`` in config; and
the papers that join any method as add-ons, one package each (``scorecl/``, ``clsp/``), found through
``weighting._target_`` / ``positives._target_``."""
