"""Audit a dataset folder before training: unreadable files, duplicates and leaks, photo quality, class balance,
likely wrong labels, and how much of an unlabelled test folder looks like no training class (audit.py)."""
