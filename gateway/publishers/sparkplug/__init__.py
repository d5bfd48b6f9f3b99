"""Sparkplug B 3.0: the payload schema and its generated code, payload helpers, the edge node."""
