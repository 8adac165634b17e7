"""GPU kernels (installed as ``diffaccel.kernels``).

Each kernel lives beside a pure-torch reference implementation of the same function and is chosen
at run time; the reference is what runs (and is tested) on machines without a GPU.
"""
