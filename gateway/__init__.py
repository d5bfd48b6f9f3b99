"""Millwright: an industrial edge gateway from Modbus and OPC UA to MQTT."""

__version__ = "0.1.0"
