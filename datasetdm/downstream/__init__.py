"""Downstream uplift: does the synthetic data help a model trained on it?"""
