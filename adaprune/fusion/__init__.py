"""Fusion: one score per unit from the candidates of every estimator and granularity.

`base` holds the interface (`FusionPolicy`, `FusionContext`, `FusionResult`), `fixed` the policies
with fixed weights, `adaptive` the trained blend.
"""
