"""Training-time pruning: scores, masks, schedules, the selection of what to prune (config_list entries) and the
pruners that `PruningTrainer` drives."""
