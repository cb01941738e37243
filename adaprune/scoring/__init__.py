"""Scoring: the one calibration pass, the score cache, and the candidates handed to fusion."""
