module mailrelay.dev/bench/loadgen

go 1.22
