"""Analyses built on the model: sensitivity of clinical endpoints, treatment decisions."""
