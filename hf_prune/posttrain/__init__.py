"""Retraining-free pruning to a speed target (Kwon et al. 2022): Fisher information of unit masks, the search under a
cost model, calibration on measured timings, mask rearrangement and least-squares mask tuning."""
