"""OPC UA collector: settings, node ids, value conversion, security, the collector and browse."""
