"""The gateway's HTTP side: health, Prometheus metrics and the JSON status, from its `State`.

One aiohttp server in the gateway's own event loop (`serve`), read-only: it shows what the
engine keeps in `State` and never takes part in delivery.
"""
