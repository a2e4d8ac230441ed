"""SSL methods: one small file each (heads + loss), found through ``method._target_`` in config."""
