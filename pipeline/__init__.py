import os

# libgomp's default busy-wait makes PyTorch 10-40x slower whenever another process shares the cores
# (measured: a tiny-sd3 transformer step took 1200 ms with 2 spinning threads on a loaded 2-core box,
# 58 ms with passive waiting). Entry points set it before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
