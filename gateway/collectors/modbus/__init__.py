"""Modbus TCP collector: settings, codec, request planner and the collector itself."""
