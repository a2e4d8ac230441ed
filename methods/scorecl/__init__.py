"""ScoreCL (pair weights from a score network's noise response): the add-on (``addon.ScoreCL``), its
score network (``score_net``) and its config checks (``ScoreCL.check_config``)."""
