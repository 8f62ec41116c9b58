"""Every MPI call and the rank layout: topology (the one rank -> role map), collectives, transports (staged,
CUDA-aware MPI, CUDA IPC), GPU binding, MPI/CUDA detection, the launcher's environment, `rshard doctor`.
"""
