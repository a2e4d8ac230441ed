"""Reading results: text summaries, the leaderboard page, regression reports. Never imports torch."""
