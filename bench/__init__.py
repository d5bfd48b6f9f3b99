"""Benchmarks: the gateway, the simulators, a real mosquitto and a counting subscriber as
separate processes on loopback. Not part of the test run; see bench/README.md."""
