"""Pruning and distillation inside other libraries' trainers (trl). Each module imports its library at the top, so
hf_prune itself never needs it."""
