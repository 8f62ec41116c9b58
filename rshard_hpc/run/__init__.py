"""The job a user runs: options and job files, set-up of every rank, the client's job, prompt and results
files, progress, SIGTERM handling, and the test hooks.
"""
