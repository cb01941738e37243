"""Stages after apply: what repairs the cut (see `base.Stage`)."""
