"""Architecture knowledge: one adapter per model family (where the prunable units live and how they shrink), the
physical surgery that asks the adapters, the cost of each unit, and the remote-code modeling files of pruned models.

Nothing outside this subpackage names a module path of a model."""
