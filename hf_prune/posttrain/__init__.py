"""Retraining-free pruning to a speed target (Kwon et al. 2022): Fisher information of unit masks, the search under a
cost model, calibration on measured timings, mask rearrangement and least-squares mask tuning."""


def __getattr__(name: str):
    # hf_prune 0.1 had a module of this name: its names (`from hf_prune.posttrain import prune_to_speedup`) keep
    # working for one release, with a DeprecationWarning
    from .._deprecated import moved_attribute

    return moved_attribute("posttrain", name)
