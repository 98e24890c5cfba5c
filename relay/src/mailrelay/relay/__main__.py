"""Entry point for `python -m mailrelay.relay`."""

import sys

from mailrelay.relay.main import main

sys.exit(main())
