"""Bundled device simulators (Modbus TCP stamping press) and the signal models behind them."""
