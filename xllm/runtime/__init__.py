"""Executor: a scheduled batch becomes tensors, runs through the model, and is sampled."""
