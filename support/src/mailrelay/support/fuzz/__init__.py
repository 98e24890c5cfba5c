"""The SMTP session fuzzer: a model of the relay's replies, a target relay, the wire."""
