"""qcast under an initialised ``torch.distributed`` process group (torchrun, Slurm, torch.multiprocessing).

* ``qcast.distributed.search``: sensitivity and the accuracy-aware search split across ranks (docs/scale.md).

(The calibration side, qcast/distributed/group.py, comes from the dist-calib branch; this file is merged there.)
"""
