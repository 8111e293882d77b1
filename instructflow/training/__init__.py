"""Pieces of the train stage (tasks/train.py): packing collators, callbacks, test data."""
