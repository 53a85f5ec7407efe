"""Inspecting what effopt did to a model: `effopt.explain` (effopt/inspect/explain.py), the report's HTML page
(html.py), the graph drawing (graph_svg.py) and graph statistics (stats.py)."""
from .explain import explain

__all__ = ["explain"]
