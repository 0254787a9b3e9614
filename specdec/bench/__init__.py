"""`specdec bench`: the tokens/sec benchmark suite (see runner.py)."""
