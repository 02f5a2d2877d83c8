"""Test helpers: real loopback servers, a fault-injecting TCP relay, polling."""

from .relay import MODES, FaultRelay, RelayMode
from .servers import EchoServer, free_port, run_http_server, wait_for_port, wait_until

__all__ = [
    "MODES",
    "EchoServer",
    "FaultRelay",
    "RelayMode",
    "free_port",
    "run_http_server",
    "wait_for_port",
    "wait_until",
]
