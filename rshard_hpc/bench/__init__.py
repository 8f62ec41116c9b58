"""Benchmarks behind `rshard bench` (kernel, job, passes): each prints a table and writes it to a file."""
