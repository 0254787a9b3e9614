"""Training: `specdec distill` (a draft for any target) and the embedded demo pair."""
