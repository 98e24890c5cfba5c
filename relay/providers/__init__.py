"""HTTP API upstreams: one transport class per provider behind the relay's Transport protocol."""
