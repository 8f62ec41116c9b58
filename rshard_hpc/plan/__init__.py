"""Who sees what (architecture.md §3-§4): plan schemes, views/runs/gaps, the δ check and layout search, the
visibility ledger and the plan report. Plain NumPy, no MPI.
"""
