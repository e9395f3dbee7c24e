"""Staged recipes: the schema and runner, the stages, tasks and their data, metrics, model sources and the offline
demo task."""
