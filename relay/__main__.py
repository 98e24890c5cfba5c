"""Entry point for `python -m mailrelay.relay`."""
