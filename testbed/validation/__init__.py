"""Simulator against the real system: validation runs, calibration of the simulator's free parameters, and
the GPU TTFT measurement with its simulated counterpart.  The one part of the testbed that runs SimPy."""
