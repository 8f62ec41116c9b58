"""Array operations with no MPI: the NumPy/CuPy switch, partial attention and merge (NumPy and the CUDA launch
layer), and engine precision (bf16 rounding and wire packing).
"""
